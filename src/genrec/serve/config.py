"""Settings of ``genrec serve``: where it listens, who may call it, how it batches and sheds load.

Loaded like every genrec config: ``key=value`` overrides, strictly (unknown keys and wrong
types are errors naming the key), then checked in ``__post_init__``. The API key may come
from the environment (``GENREC_API_KEY``) so that it never shows in the process list.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from genrec.config import ConfigError, _build, parse_overrides

API_KEY_ENV = "GENREC_API_KEY"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it is treated as public


@dataclass
class ServeConfig:
    """The HTTP service (see docs/serving.md)."""

    # Address and port to bind. Anything but a loopback address requires an API key.
    host: str = "127.0.0.1"
    port: int = 8000
    # Clients send it in the X-API-Key header; empty means no authentication (loopback only,
    # unless allow_unauthenticated). Defaults to $GENREC_API_KEY.
    api_key: str = ""
    # Serve a non-loopback address without an API key (a trusted network behind a proxy).
    allow_unauthenticated: bool = False
    # Which model of the run: "auto" (the first trained of rl, sft, agent_rl, agent_sft, gream_rl,
    # gream_sft), or one of those stage names.
    model: str = "auto"
    # "cpu", "cuda", ... (empty: cuda when available, else cpu).
    device: str = ""
    # Beams of the constrained beam search; a request needing more candidates (k plus the
    # seen items it excludes) doubles it until it has enough.
    num_beams: int = 20
    # Reasoning mode (GREAM-trained models): the rationale's token budget.
    max_think_tokens: int = 48
    # Largest k a request may ask for.
    max_k: int = 100
    # Longest history a request may send (the model reads its last data.max_history items;
    # all of them are excluded from the answer when exclude_seen).
    max_history_items: int = 200
    # Requests decoded together in one beam search, at most.
    max_batch_size: int = 32
    # A batch gathers requests until it is full, or none has arrived for arrival_gap_ms, or
    # its first request has waited max_wait_ms (milliseconds).
    max_wait_ms: float = 20.0
    arrival_gap_ms: float = 2.0
    # Requests waiting for the model, at most; beyond it the service answers 503 with Retry-After.
    max_queue: int = 256
    # Largest request body in bytes (413 beyond it).
    max_body_bytes: int = 65536
    # On shutdown, how long requests in flight may take to finish, in seconds.
    shutdown_timeout_s: int = 30

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(0 <= self.port <= 65535, f"serve.port must be in 0..65535, got {self.port}")
        models = ("auto", "rl", "sft", "agent_rl", "agent_sft", "gream_rl", "gream_sft")
        check(self.model in models, f"serve.model must be one of {', '.join(models)}; got {self.model!r}")
        check(
            min(self.num_beams, self.max_k, self.max_think_tokens) >= 1,
            "serve.num_beams, serve.max_k and serve.max_think_tokens must be >= 1",
        )
        check(self.max_history_items >= 1, f"serve.max_history_items must be >= 1, got {self.max_history_items}")
        check(self.max_batch_size >= 1 and self.max_queue >= 1, "serve.max_batch_size and serve.max_queue must be >= 1")
        check(
            self.max_wait_ms >= 0 and self.arrival_gap_ms >= 0,
            "serve.max_wait_ms and serve.arrival_gap_ms must be >= 0",
        )
        check(self.shutdown_timeout_s >= 1, f"serve.shutdown_timeout_s must be >= 1, got {self.shutdown_timeout_s}")
        check(self.max_body_bytes >= 1024, f"serve.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        check(
            bool(self.api_key) or self.allow_unauthenticated or is_loopback(self.host),
            f"serve.host={self.host} is not a loopback address, so an API key is required: set ${API_KEY_ENV} "
            "(or api_key=...), or pass allow_unauthenticated=true to serve without one",
        )


def load_serve_config(overrides: list[str] | None = None, **values) -> ServeConfig:
    """A ServeConfig from ``key=value`` overrides and keyword values; the API key defaults to $GENREC_API_KEY."""
    tree = {**values, **parse_overrides(overrides or [])}
    if not tree.get("api_key") and os.environ.get(API_KEY_ENV):
        tree["api_key"] = os.environ[API_KEY_ENV]
    return _build(ServeConfig, tree, "serve.")
