"""Dataclass configs, loaded from YAML with ``key=value`` overrides, strictly.

One dataclass per stage; :class:`RunConfig` gathers them. Every field has a default
and a comment, ``__post_init__`` rejects bad values with a message that says what to
change, and the loader rejects unknown keys and wrong types naming the full key path
(``sasrec.hidden_size``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------- stages


@dataclass
class DataConfig:
    """What raw data to read and how to prepare it (stage ``prepare``)."""

    # Reader name, see ``genrec.data.readers.READERS``: ml-100k, amazon2014, amazon2018,
    # amazon2023, lcrec, s3rec, recbole, csv.
    format: str = "ml-100k"
    # Directory holding the raw files; empty for ml-100k means the fetched cache.
    path: str = ""
    # Dataset name inside ``path`` (Amazon category, LC-Rec/S3-Rec prefix, RecBole name).
    name: str = ""
    # Keep interactions with rating >= min_rating (0 keeps all; ML-100K papers keep all).
    min_rating: float = 0.0
    # Iterative k-core on users and items (0 or 1 disables).
    kcore: int = 5
    # Longest history a model sees (the most recent items).
    max_history: int = 20
    # Split protocol: "loo" (last item test, second-to-last valid) or "chrono" (global time).
    protocol: str = "loo"
    # chrono only: fractions of the time-sorted interactions that go to valid and test.
    chrono_valid: float = 0.1
    chrono_test: float = 0.1
    # What to do with a malformed raw line: "error" (stop, naming file and line) or "skip".
    on_bad_line: str = "error"

    def __post_init__(self) -> None:
        _check(self.protocol in ("loo", "chrono"), f"data.protocol must be 'loo' or 'chrono', got {self.protocol!r}")
        _check(self.on_bad_line in ("error", "skip"), f"data.on_bad_line must be 'error' or 'skip', got {self.on_bad_line!r}")
        _check(self.max_history >= 1, f"data.max_history must be >= 1, got {self.max_history}")
        _check(self.kcore >= 0, f"data.kcore must be >= 0, got {self.kcore}")
        _check(
            0 < self.chrono_valid < 1 and 0 < self.chrono_test < 1 and self.chrono_valid + self.chrono_test < 1,
            "data.chrono_valid and data.chrono_test must be in (0, 1) and sum below 1",
        )


@dataclass
class EvalConfig:
    """The evaluation protocol, identical for every model in a run."""

    # Cut-offs for HR@K and NDCG@K; the ranked lists written are max(ks) long.
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    # Remove items already in the user's history from the ranking (never the target,
    # which is excluded from the history by construction).
    exclude_seen: bool = True
    # Bootstrap resamples for the 95% confidence intervals (0 disables).
    bootstrap: int = 1000
    # Users scored per batch.
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"eval.ks must be positive integers, got {self.ks}")
        self.ks = sorted(set(self.ks))


@dataclass
class SASRecConfig:
    """SASRec trained with full-softmax cross-entropy (Kang & McAuley 2018; CE variant)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.5
    # Context length (most recent items); defaults to data.max_history when 0.
    max_len: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 200
    # Stop when valid NDCG@10 has not improved for this many evaluations.
    patience: int = 10
    # Evaluate on valid every this many epochs.
    eval_every: int = 2
    # Hard wall-clock budget for training in minutes (0 = none).
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "sasrec.hidden_size must be divisible by sasrec.num_heads")
        _check(0.0 <= self.dropout < 1.0, f"sasrec.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TextConfig:
    """Item text composition (stage ``text``)."""

    # Template over item fields; missing fields are dropped with their label.
    # Named templates: "default"; or a format string such as "{title}. {brand}. {categories}".
    template: str = "default"
    # Cap on characters per item text.
    max_chars: int = 512


@dataclass
class EmbedConfig:
    """Item text embeddings (stage ``embed``)."""

    # "minilm" (the offline all-MiniLM-L6-v2 wheel), "st:<dir>" (sentence-transformers
    # directory), "hf:<dir>" (HF encoder, mean-pooled), "lm:<dir>" (causal LM, mean-pooled).
    encoder: str = "minilm"
    batch_size: int = 128
    # Where per-text embeddings are cached by content hash (empty: <run_dir>/../.cache/embed).
    cache_dir: str = ""


@dataclass
class SIDConfig:
    """Semantic IDs: quantiser, levels, collision handling (stage ``sid``)."""

    # "rqvae", "rkmeans" (residual k-means, faiss) or "rkmeans_balanced".
    quantizer: str = "rkmeans_balanced"
    levels: int = 3
    codebook_size: int = 256
    # "sinkhorn" (balanced last level) or "dedup" (an extra level: rank inside the collision group).
    collision: str = "dedup"
    # RQ-VAE settings.
    rqvae_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    rqvae_latent: int = 32
    rqvae_epochs: int = 200
    rqvae_lr: float = 1e-3
    rqvae_beta: float = 0.25
    rqvae_batch_size: int = 1024
    kmeans_iters: int = 25

    def __post_init__(self) -> None:
        _check(self.quantizer in ("rqvae", "rkmeans", "rkmeans_balanced"), f"sid.quantizer: unknown {self.quantizer!r}")
        _check(self.collision in ("sinkhorn", "dedup"), f"sid.collision must be 'sinkhorn' or 'dedup', got {self.collision!r}")
        _check(self.levels >= 1 and self.codebook_size >= 2, "sid.levels must be >= 1 and sid.codebook_size >= 2")


@dataclass
class ModelConfig:
    """The causal-LM backbone."""

    # "scratch" builds a small Qwen2 from the sizes below; otherwise a local directory
    # holding a pretrained Hugging Face checkpoint (never a hub name: nothing is downloaded).
    backbone: str = "scratch"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    # Size of the text vocabulary trained with `tokenizers` for the scratch model.
    text_vocab_size: int = 2000
    # LoRA (PEFT) on a pretrained backbone; 0 disables.
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    dropout: float = 0.1


@dataclass
class SFTConfig:
    """Multi-task supervised fine-tuning (stage ``sft``)."""

    # Task name -> mixing weight; see genrec.tasks.TASKS.
    tasks: dict[str, float] = field(default_factory=lambda: {"seqrec": 1.0})
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_epochs: int = 50
    warmup_steps: int = 100
    patience: int = 5
    eval_every: int = 1
    # Users sampled from valid for early stopping (0 = all).
    eval_users: int = 1000
    max_minutes: float = 0.0
    grad_clip: float = 1.0


@dataclass
class DecodeConfig:
    """Trie-constrained beam search."""

    num_beams: int = 20
    batch_size: int = 64


@dataclass
class RLConfig:
    """GRPO-family post-training (stage ``rl``)."""

    # Reward name -> weight; see genrec.train.rewards.REWARDS.
    rewards: dict[str, float] = field(default_factory=lambda: {"exact": 1.0, "rank": 1.0})
    # "grpo" or "bgae" (bonus-calibrated, for sparse successes).
    advantage: str = "grpo"
    # "grpo" (sequence mean), "dapo" (token mean) or "gspo" (sequence-level ratio).
    loss: str = "dapo"
    # "beam" (the group is the beams of a constrained beam search) or "sample".
    rollout: str = "beam"
    group_size: int = 16
    temperature: float = 1.0
    lr: float = 1e-5
    kl_coef: float = 1e-3
    clip_eps: float = 0.2
    batch_size: int = 32
    steps: int = 200
    eval_every: int = 50
    max_minutes: float = 0.0


# --------------------------------------------------------------------------- the run


@dataclass
class RunConfig:
    """Everything one run needs; each section belongs to one stage."""

    # Where every stage writes; relative paths are relative to the working directory.
    run_dir: str = ""
    # The one seed of the run: every stage derives its generator from it.
    seed: int = 42
    # Stages `genrec run` executes, in order.
    stages: list[str] = field(default_factory=lambda: ["prepare", "popularity", "sasrec"])
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir is required: set it in the YAML or pass run_dir=PATH")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["sasrec.lr=0.01", "stages=[prepare]"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. sasrec.lr=0.001)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (optional) plus ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
        tree = loaded or {}
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return _build(RunConfig, tree)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is saved beside every output)."""
    return dataclasses.asdict(cfg)


def config_hash(obj: Any) -> str:
    """A stable short hash of plain data or a dataclass."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
