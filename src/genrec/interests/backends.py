"""Chat backends that mine interests: any OpenAI-compatible endpoint, or a local Hugging Face model.

A backend is anything with ``name``, ``model``, ``max_concurrency``, ``params`` (the
sampling parameters that enter the cache key) and ``complete(messages, **params) ->
ChatResult``. ``complete`` either returns the model's answer (possibly malformed: that is
the miner's business) or raises :class:`CallFailed` once its own retries are spent; a
:class:`BackendError` (wrong key, unknown model, missing directory) is a configuration
problem that stops the run, since every other call would fail the same way.

The OpenAI client is built with ``max_retries=0``: retries happen here, with an
injectable ``sleep``, so that the backoff is visible, testable and honours Retry-After.
API keys are read from the environment, handed to the client, and kept nowhere else.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from genrec.interests.config import BackendConfig, InterestsConfig

log = logging.getLogger("genrec")

# HTTP statuses worth asking again: request timeout, conflict, rate limit, server errors.
RETRY_STATUSES = {408, 409, 429}


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int


class ChatBackend(Protocol):
    name: str
    model: str
    max_concurrency: int
    params: dict[str, Any]

    def complete(self, messages: list[dict], **params: Any) -> ChatResult: ...


class CallFailed(RuntimeError):
    """One call gave no answer after its retries (timeouts, 429s, 5xx, a rejected request)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BackendError(RuntimeError):
    """A backend that cannot work at all (missing key or model, refused credentials): fix the config."""


def backoff_seconds(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's Retry-After if given, else base * 2**attempt."""
    if retry_after is not None:
        return min(cap, max(0.0, retry_after))
    return min(cap, base * 2**attempt)


def _retry_after(response: Any) -> float | None:
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAIBackend:
    """A chat model behind an OpenAI-compatible ``/v1/chat/completions`` (vLLM, Ollama, llama.cpp, hosted APIs)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        temperature: float = 0.0,
        max_tokens: int = 768,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from openai import OpenAI

        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not api_key:
            raise BackendError(
                f"backend {name!r}: the environment variable {api_key_env} holding its API key is not set; "
                f"export it, or set api_key_env: '' for a server that needs no key"
            )
        self.name, self.model, self.base_url = name, model, base_url
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self._backoff = (backoff_base, backoff_max)
        self._sleep = sleep
        # Servers that need no key still get a placeholder: the client insists on one.
        self._client = OpenAI(api_key=api_key or "no-key", base_url=base_url, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIBackend(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    def complete(self, messages: list[dict], **params: Any) -> ChatResult:
        import openai

        params = {**self.params, **params}
        reason, detail = "", ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self._client.chat.completions.create(model=self.model, messages=messages, **params)
            except openai.APITimeoutError as exc:
                reason, detail = "timeout", str(exc)
            except openai.APIConnectionError as exc:
                reason, detail = "connection", str(exc)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise BackendError(
                    f"backend {self.name!r} at {self.base_url}: credentials refused "
                    f"(HTTP {exc.status_code}); check the API key's environment variable"
                ) from None
            except openai.NotFoundError as exc:
                raise BackendError(
                    f"backend {self.name!r}: {self.base_url} has no model {self.model!r} or no "
                    f"chat endpoint (HTTP 404: {exc.message})"
                ) from None
            except openai.APIStatusError as exc:
                reason, detail = f"http_{exc.status_code}", exc.message
                if exc.status_code not in RETRY_STATUSES and exc.status_code < 500:
                    raise CallFailed(reason, f"backend {self.name!r}: request rejected: {detail}") from None
                retry_after = _retry_after(exc.response)
            else:
                text = resp.choices[0].message.content if resp.choices else ""
                usage = resp.usage
                return ChatResult(
                    text or "",
                    int(usage.prompt_tokens) if usage else 0,
                    int(usage.completion_tokens) if usage else 0,
                )
            if attempt < self.max_retries:
                wait = backoff_seconds(attempt, *self._backoff, retry_after)
                log.debug("backend %s: %s, retry %d in %.1fs", self.name, reason, attempt + 1, wait)
                self._sleep(wait)
        raise CallFailed(reason, f"backend {self.name!r}: {reason} after {self.max_retries + 1} attempts: {detail}")


class VisionBackend(OpenAIBackend):
    """An OpenAI-compatible vision-language model; it sends item images as content parts.

    Image URLs go as they are; local files go inline as base64 data URLs, since the model
    server cannot read this machine's files.
    """

    def image_part(self, image: str, root: str | Path | None = None) -> dict:
        return image_content_part(image, root)


def image_content_part(image: str, root: str | Path | None = None) -> dict:
    """An OpenAI ``image_url`` content part for a URL, a data URL, or a file (relative to ``root``)."""
    if image.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": image}}
    path = Path(root or ".") / image
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found (relative paths are read from {Path(root or '.')})")
    mime = mimetypes.guess_type(path.name)[0]
    if mime is None or not mime.startswith("image/"):
        raise ValueError(f"image file {path}: not a known image type (use .jpg, .png, .webp or .gif)")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


class HFLocalBackend:
    """A chat model from a local Hugging Face directory (never downloaded), answering one prompt at a time."""

    max_concurrency = 1

    def __init__(self, name: str, model_dir: str | Path, temperature: float = 0.0, max_tokens: int = 768):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise BackendError(f"backend {name!r}: {path} is not a Hugging Face model directory (no config.json)")
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not self.tokenizer.chat_template:
            raise BackendError(f"backend {name!r}: {path} has no chat template; use an instruction-tuned model")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").to(self.device)
        self.lm.eval()
        # The model's identity in the cache: its path and a fingerprint of its files, so
        # that new weights in the same directory are asked afresh.
        self.model = f"{path.resolve()}@{_dir_fingerprint(path)}"
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], **params: Any) -> ChatResult:
        import torch

        params = {**self.params, **params}
        if any(not isinstance(m.get("content"), str) for m in messages):
            raise CallFailed("unsupported", f"backend {self.name!r}: a local HF model takes text messages only")
        enc = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        sample = params["temperature"] > 0
        with self._lock, torch.no_grad():
            out = self.lm.generate(
                **enc,
                max_new_tokens=params["max_tokens"],
                do_sample=sample,
                temperature=params["temperature"] if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        prompt_len = enc["input_ids"].shape[1]
        new = out[0, prompt_len:]  # (T_new,) the answer's tokens
        return ChatResult(self.tokenizer.decode(new, skip_special_tokens=True), prompt_len, int(new.shape[0]))


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update((path / "config.json").read_bytes())
    return h.hexdigest()[:12]


def make_backend(
    cfg: BackendConfig, icfg: InterestsConfig, items: pd.DataFrame, sleep: Callable[[float], None] = time.sleep
):
    """The backend a config names: an OpenAIBackend, an HFLocalBackend or the OfflineMiner over ``items``."""
    if cfg.kind == "offline":
        from genrec.interests.offline import OfflineMiner

        return OfflineMiner(items, name=cfg.name, max_interests=icfg.max_interests)
    if cfg.kind == "hf":
        return HFLocalBackend(cfg.name, cfg.model, temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    cls = VisionBackend if icfg.vision is cfg else OpenAIBackend
    return cls(
        cfg.name,
        cfg.base_url,
        cfg.model,
        api_key_env=cfg.api_key_env,
        max_concurrency=cfg.max_concurrency,
        timeout=cfg.timeout,
        max_retries=cfg.max_retries,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        backoff_base=icfg.backoff_base,
        backoff_max=icfg.backoff_max,
        sleep=sleep,
    )
