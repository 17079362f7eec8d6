"""Configuration of interest mining (stage ``interests``): which backends, how to call them, how to merge.

A backend is named by a plain ``kind`` (see :func:`genrec.interests.backends.make_backend`); API keys
never appear here, only the name of the environment variable that holds one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from genrec.errors import check as _check

BACKEND_KINDS = ("openai", "hf", "offline")


@dataclass
class BackendConfig:
    """One interest miner: an OpenAI-compatible endpoint, a local HF model, or the offline miner."""

    # Label of the backend: it names the backend in the outputs and enters the cache key,
    # so renaming a backend re-asks every question.
    name: str = "offline-metadata"
    # "openai" (any OpenAI-compatible chat endpoint: vLLM, Ollama, llama.cpp server, hosted
    # APIs), "hf" (a local Hugging Face causal LM directory) or "offline" (no LLM: interests
    # from item metadata and tf-idf keywords).
    kind: str = "offline"
    # openai: the served model name; hf: the model directory; offline: unused.
    model: str = ""
    # openai: the endpoint up to /v1, e.g. http://127.0.0.1:8000/v1 (vLLM) or
    # http://127.0.0.1:11434/v1 (Ollama).
    base_url: str = ""
    # openai: the environment variable holding the API key; empty for servers that need none.
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight at once (hf always runs one at a time).
    max_concurrency: int = 4
    # Seconds before one request is abandoned (and retried).
    timeout: float = 60.0
    # Retries of one request after a timeout, a connection error, HTTP 429 or 5xx.
    max_retries: int = 4
    # Sampling: 0 is greedy, as in DeepInterestGR's miner.
    temperature: float = 0.0
    # Longest answer in tokens.
    max_tokens: int = 768

    def __post_init__(self) -> None:
        where = f"interests backend {self.name!r}"
        _check(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", self.name)),
            f"interests backend name {self.name!r} must be letters, digits and . _ : - (it names output rows)",
        )
        _check(
            self.kind in BACKEND_KINDS, f"{where}: kind must be one of {', '.join(BACKEND_KINDS)}, got {self.kind!r}"
        )
        if self.kind == "openai":
            _check(bool(self.base_url), f"{where}: kind openai needs base_url, e.g. http://127.0.0.1:8000/v1")
            _check(bool(self.model), f"{where}: kind openai needs model, the name the server serves")
        if self.kind == "hf":
            _check(bool(self.model), f"{where}: kind hf needs model, a local model directory")
        _check(self.max_concurrency >= 1, f"{where}: max_concurrency must be >= 1, got {self.max_concurrency}")
        _check(self.timeout > 0, f"{where}: timeout must be > 0 seconds, got {self.timeout}")
        _check(self.max_retries >= 0, f"{where}: max_retries must be >= 0, got {self.max_retries}")
        _check(self.temperature >= 0, f"{where}: temperature must be >= 0, got {self.temperature}")
        _check(self.max_tokens >= 16, f"{where}: max_tokens must be >= 16, got {self.max_tokens}")


@dataclass
class InterestsConfig:
    """Interest mining (MLIM): per-item and per-user interests from one or several backends."""

    # The miners; several run side by side and their interests are merged by agreement.
    backends: list[BackendConfig] = field(default_factory=lambda: [BackendConfig()])
    # An OpenAI-compatible vision-language model that captions item images before mining
    # (only used where the items table has a non-empty image column); None disables.
    vision: BackendConfig | None = None
    # Items column holding an image URL (http/https/data) or a local file path.
    image_field: str = "image"
    # What to mine: "items", "users" or both.
    mine: list[str] = field(default_factory=lambda: ["items", "users"])
    # Interests asked for per item or user (longer answers are cut to this many).
    max_interests: int = 5
    # Most recent training items shown in a user prompt.
    user_history: int = 20
    # Characters kept of each text field (title, description, review) in a prompt.
    max_field_chars: int = 300
    # Times a malformed answer (invalid JSON, empty, refusal, schema violation) is re-asked,
    # quoting the problem back to the model, before it is recorded as a failure.
    malformed_retries: int = 2
    # Backoff before retry k (0-based) of a failed request: min(backoff_max, backoff_base * 2**k)
    # seconds, or the server's Retry-After when it sends one.
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    # Interests of different backends whose embeddings have cosine >= this are one interest.
    # With MiniLM: "lip balm"/"lip balms" 0.94, "lip care"/"lip-care products" 0.86 (merged);
    # "gift shopping"/"buying presents" 0.78, "lip balm"/"hair oil" 0.37 (kept apart).
    merge_threshold: float = 0.8
    # Sentence encoder for merging: "minilm" (the offline all-MiniLM-L6-v2 wheel) or
    # "st:<dir>" (a sentence-transformers directory).
    embedder: str = "minilm"
    # The persistent SQLite call cache; empty means <run_dir>/../.cache/interests/calls.sqlite,
    # shared by the runs beside this one.
    cache_path: str = ""
    # Mine only the first N items / users (0 = all): a cost cap for trying a paid API.
    max_items: int = 0
    max_users: int = 0

    def __post_init__(self) -> None:
        _check(len(self.backends) >= 1, "interests.backends must name at least one backend (e.g. kind: offline)")
        names = [b.name for b in self.backends]
        _check(len(set(names)) == len(names), f"interests.backends: names must be unique, got {names}")
        if self.vision is not None:
            _check(
                self.vision.kind == "openai",
                f"interests.vision must be kind openai (a vision-language chat endpoint), got {self.vision.kind!r}",
            )
        _check(
            bool(self.mine) and set(self.mine) <= {"items", "users"},
            f"interests.mine must list 'items' and/or 'users', got {self.mine}",
        )
        _check(self.max_interests >= 1, f"interests.max_interests must be >= 1, got {self.max_interests}")
        _check(self.user_history >= 1, f"interests.user_history must be >= 1, got {self.user_history}")
        _check(self.max_field_chars >= 20, f"interests.max_field_chars must be >= 20, got {self.max_field_chars}")
        _check(self.malformed_retries >= 0, f"interests.malformed_retries must be >= 0, got {self.malformed_retries}")
        _check(
            0 <= self.backoff_base <= self.backoff_max,
            "interests.backoff_base must be >= 0 and <= interests.backoff_max",
        )
        _check(
            0 < self.merge_threshold <= 1, f"interests.merge_threshold must be in (0, 1], got {self.merge_threshold}"
        )
        _check(
            self.embedder == "minilm" or self.embedder.startswith("st:"),
            f"interests.embedder must be 'minilm' or 'st:<dir>', got {self.embedder!r}",
        )
        _check(self.max_items >= 0 and self.max_users >= 0, "interests.max_items and interests.max_users must be >= 0")


@dataclass
class RLDIConfig:
    """Reward labels of mined interests (stage ``rldi``): a small classifier over interest embeddings.

    Labels to train it come from training-split behaviour (offline) or from a judge LLM; see
    docs/interests.md for how and why.
    """

    # Where the training labels come from: "behaviour" (an interest mined from a user's training
    # prefix is positive when the user's held-out later training items match it more often than
    # the average training interaction does) or "judge" (the ``judge`` LLM labels item interests
    # 1 = specific and grounded, 0 = vague, generic or unsupported).
    labels: str = "behaviour"
    # behaviour: the last this-many training items of each user are held out of the mining prefix;
    # they label the prefix's interests. Set it >= rl.targets_per_user so that no RL target (and,
    # by construction, no interest2sid target) is among the items its user's interests were mined from.
    holdout: int = 3
    # An interest matches an item when its embedding has cosine >= this with one of the item's
    # mined interests (the same scale as interests.merge_threshold).
    match_threshold: float = 0.8
    # "logreg" (logistic regression) or "mlp" (one hidden layer of ``hidden`` units), scikit-learn.
    classifier: str = "logreg"
    hidden: int = 64
    # L2 penalty: the logistic regression's C is 1 / l2, the MLP's alpha is l2.
    l2: float = 1.0
    # Share of the labelled owners (users, or items for the judge) held out to measure accuracy and AUC.
    test_fraction: float = 0.2
    # An interest is positive when the classifier's probability is >= this.
    threshold: float = 0.5
    # False labels every interest positive (the "without RLDI" ablation); the classifier is still
    # trained and measured.
    curate: bool = True
    # The judge LLM (an interests-style backend, kind openai or hf) for ``labels: judge``.
    judge: BackendConfig | None = None
    # Label at most this many users (behaviour) or items (judge); 0 = all. A cost cap for LLM backends.
    max_owners: int = 0

    def __post_init__(self) -> None:
        _check(
            self.labels in ("behaviour", "judge"), f"rldi.labels must be 'behaviour' or 'judge', got {self.labels!r}"
        )
        _check(
            self.labels != "judge" or (self.judge is not None and self.judge.kind != "offline"),
            "rldi.labels: judge needs rldi.judge, an LLM backend (kind openai or hf)",
        )
        _check(self.holdout >= 1, f"rldi.holdout must be >= 1, got {self.holdout}")
        _check(0 < self.match_threshold <= 1, f"rldi.match_threshold must be in (0, 1], got {self.match_threshold}")
        _check(
            self.classifier in ("logreg", "mlp"), f"rldi.classifier must be 'logreg' or 'mlp', got {self.classifier!r}"
        )
        _check(self.hidden >= 1 and self.l2 > 0, "rldi.hidden must be >= 1 and rldi.l2 > 0")
        _check(0 < self.test_fraction < 1, f"rldi.test_fraction must be in (0, 1), got {self.test_fraction}")
        _check(0 < self.threshold < 1, f"rldi.threshold must be in (0, 1), got {self.threshold}")
        _check(self.max_owners >= 0, f"rldi.max_owners must be >= 0, got {self.max_owners}")
