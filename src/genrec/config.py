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

from genrec.agent.config import AgentConfig
from genrec.errors import ConfigError
from genrec.errors import check as _check

# Sections that live beside their stage's code.
from genrec.interests.config import InterestsConfig, RLDIConfig
from genrec.methods.gream.config import GREAMConfig

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
        _check(
            self.on_bad_line in ("error", "skip"),
            f"data.on_bad_line must be 'error' or 'skip', got {self.on_bad_line!r}",
        )
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
    # Held-out splits that the final evaluations rank (validation during training always uses
    # valid). ["test"] halves the cost of a slow mode on a large dataset when only test is reported.
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])

    def __post_init__(self) -> None:
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"eval.ks must be positive integers, got {self.ks}")
        self.ks = sorted(set(self.ks))
        _check(
            len(self.splits) > 0 and all(s in ("valid", "test") for s in self.splits),
            f"eval.splits must be a non-empty list of valid and test, got {self.splits}",
        )
        self.splits = [s for s in ("valid", "test") if s in self.splits]


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
    # The first lr_drops times patience runs out, go back to the best weights and multiply the
    # learning rate by lr_drop_factor instead of stopping (genrec.train.epochs).
    lr_drops: int = 0
    lr_drop_factor: float = 0.1

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "sasrec.hidden_size must be divisible by sasrec.num_heads")
        _check(self.lr_drops >= 0, f"sasrec.lr_drops must be >= 0, got {self.lr_drops}")
        _check(0 < self.lr_drop_factor < 1, f"sasrec.lr_drop_factor must be in (0, 1), got {self.lr_drop_factor}")
        _check(0.0 <= self.dropout < 1.0, f"sasrec.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TRMConfig:
    """DeepRec's preference-aware traditional recommender (stage ``trm``; see docs/deeprec.md)."""

    # Transformer width, depth and heads over the history (and the size of the item representation).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    # Dropout on the input embeddings and inside the Transformer.
    dropout: float = 0.3
    # Adam learning rate, and training windows per batch.
    lr: float = 2e-3
    batch_size: int = 256
    max_epochs: int = 50
    # Evaluate valid NDCG@10 (no preference) every this many epochs; stop after `patience`
    # evaluations without improvement; the best evaluated weights are kept.
    eval_every: int = 2
    patience: int = 4
    # Hard wall-clock budget for training in minutes (0 = none).
    max_minutes: float = 0.0
    # Share of training positions that see no preference (q = 0); the others see a random
    # non-empty subset of the target item's labels, so text steers and no text still works.
    text_dropout: float = 0.5
    # Scores are cosine(query, item) / temperature.
    temperature: float = 0.05
    # An item label held by more than this share of the items (e.g. "Beauty") is not a phrase.
    max_label_share: float = 0.5
    # A preference is cut into at most this many phrases ("Drama; Romance" is two), each at most
    # phrase_chars characters long.
    max_phrases: int = 4
    phrase_chars: int = 64

    def __post_init__(self) -> None:
        _check(
            self.hidden_size >= 1 and self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
            f"trm.hidden_size ({self.hidden_size}) must be a positive multiple of trm.num_heads ({self.num_heads})",
        )
        _check(self.num_layers >= 1, f"trm.num_layers must be >= 1, got {self.num_layers}")
        _check(0.0 <= self.dropout < 1.0, f"trm.dropout must be in [0, 1), got {self.dropout}")
        _check(self.lr > 0, f"trm.lr must be > 0, got {self.lr}")
        _check(
            min(self.batch_size, self.max_epochs, self.eval_every, self.patience) >= 1,
            "trm.batch_size, trm.max_epochs, trm.eval_every and trm.patience must be >= 1",
        )
        _check(self.max_minutes >= 0, f"trm.max_minutes must be >= 0 (0 = no budget), got {self.max_minutes}")
        _check(
            0.0 <= self.text_dropout <= 1.0,
            f"trm.text_dropout must be in [0, 1] (1 trains without any text), got {self.text_dropout}",
        )
        _check(self.temperature > 0, f"trm.temperature must be > 0 (e.g. 0.05), got {self.temperature}")
        _check(0 < self.max_label_share <= 1, f"trm.max_label_share must be in (0, 1], got {self.max_label_share}")
        _check(self.max_phrases >= 1, f"trm.max_phrases must be >= 1, got {self.max_phrases}")
        _check(self.phrase_chars >= 8, f"trm.phrase_chars must be >= 8, got {self.phrase_chars}")


@dataclass
class TextConfig:
    """Item text composition (stage ``text``)."""

    # Template over item fields; an empty field is dropped with its label (the text before it).
    # Named templates (genrec.text.compose.TEMPLATES): "default", "title", "title_categories";
    # or a format string such as "{title}. Brand: {brand}. {categories}".
    template: str = "default"
    # Cap on characters per item text (cut on a word boundary).
    max_chars: int = 512
    # IEID: mined item interests folded into the text's {interests} field before embedding and
    # quantisation: "none", "all" (every interest of the ``interests`` stage) or "positive" (those
    # the ``rldi`` stage labels positive). Not "none" makes the stage read those stages.
    interests: str = "none"

    def __post_init__(self) -> None:
        _check(self.max_chars >= 16, f"text.max_chars must be >= 16, got {self.max_chars}")
        _check(
            self.interests in ("none", "all", "positive"),
            f"text.interests must be 'none', 'all' or 'positive', got {self.interests!r}",
        )


@dataclass
class EmbedConfig:
    """Item text embeddings (stage ``embed``)."""

    # "minilm" (the offline all-MiniLM-L6-v2 wheel), "st:<dir>" (sentence-transformers
    # directory), "hf:<dir>" (HF encoder, mean-pooled), "lm:<dir>" (causal LM, mean-pooled).
    encoder: str = "minilm"
    # Texts per forward pass.
    batch_size: int = 128
    # Longest input in tokens; longer texts are truncated.
    max_tokens: int = 256
    # "cpu", "cuda", ... (empty: cuda when available, else cpu).
    device: str = ""
    # L2-normalise every embedding (cosine geometry for the quantisers).
    normalize: bool = True
    # Where per-text embeddings are cached by content hash (empty: <run_dir>/../.cache/embed).
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"embed.batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_tokens >= 8, f"embed.max_tokens must be >= 8, got {self.max_tokens}")


SID_EMBEDDINGS = ("text", "sasrec", "text+sasrec")


@dataclass
class SIDConfig:
    """Semantic IDs: quantiser, levels, collision handling (stage ``sid``)."""

    # "rqvae" (RQ-VAE, PyTorch), "rkmeans" (residual k-means, faiss) or "rkmeans_balanced"
    # (every cluster capped at ceil(N/K) items). Measured in docs/sid.md.
    quantizer: str = "rkmeans_balanced"
    levels: int = 3
    codebook_size: int = 256
    # "sinkhorn" (balanced last level, then nearest free code; SIDs keep `levels` codes) or
    # "dedup" (an extra level: the rank inside the collision group) or "item" (an extra level
    # whose code is the item_id: a per-item last token under the semantic prefix).
    collision: str = "dedup"
    # What is quantised: "text" (the `embed` stage's item-text embeddings), "sasrec" (the item
    # embeddings of the run's SASRec, trained on the training sequences: collaborative SIDs) or
    # "text+sasrec" (both, each row L2-normalised, side by side). See docs/sid.md.
    embedding: str = "text"
    # Residual k-means only: quantise the embeddings projected on their top `pca_dim` principal
    # components (0: the raw embeddings). Fewer dimensions give fewer collisions and a coarser
    # reconstruction; 24 keeps Beauty/MiniLM under 5% collisions with 3 x 256 (docs/sid.md).
    pca_dim: int = 24
    # RQ-VAE settings: MLP sizes of the encoder (the decoder mirrors them), latent size,
    # AdamW epochs / learning rate / batch size, and the commitment weight beta.
    rqvae_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    rqvae_latent: int = 32
    rqvae_epochs: int = 200
    rqvae_lr: float = 1e-3
    rqvae_beta: float = 0.25
    rqvae_batch_size: int = 1024
    # Lloyd iterations per level (k-means, and RQ-VAE's codebook init).
    kmeans_iters: int = 25
    # rkmeans_balanced: Lloyd iterations with the capped assignment after the plain k-means.
    balanced_iters: int = 5

    def __post_init__(self) -> None:
        _check(
            self.quantizer in ("rqvae", "rkmeans", "rkmeans_balanced"),
            f"sid.quantizer must be rqvae, rkmeans or rkmeans_balanced, got {self.quantizer!r}",
        )
        _check(
            self.embedding in SID_EMBEDDINGS,
            f"sid.embedding must be one of {', '.join(SID_EMBEDDINGS)}, got {self.embedding!r}",
        )
        _check(
            self.collision in ("sinkhorn", "dedup", "item"),
            f"sid.collision must be 'sinkhorn', 'dedup' or 'item', got {self.collision!r}",
        )
        _check(self.levels >= 1 and self.codebook_size >= 2, "sid.levels must be >= 1 and sid.codebook_size >= 2")
        _check(
            self.levels + (self.collision != "sinkhorn") <= 8,
            f"sid.levels={self.levels} with sid.collision={self.collision} gives more than 8 SID levels "
            "(tokens are named <a_..> to <h_..>): lower sid.levels",
        )
        _check(self.pca_dim >= 0, f"sid.pca_dim must be >= 0 (0 disables the projection), got {self.pca_dim}")
        _check(
            self.kmeans_iters >= 1 and self.rqvae_epochs >= 1 and self.balanced_iters >= 0,
            "sid.kmeans_iters and sid.rqvae_epochs must be >= 1, sid.balanced_iters >= 0",
        )


ITEM_EMBEDDINGS = ("none", "learned", "sasrec", "sasrec_states")
# The item embeddings read from the run's SASRec (its stage then feeds sft).
SASREC_ITEM_EMBEDDINGS = ("sasrec", "sasrec_states")


@dataclass
class ModelConfig:
    """The causal-LM backbone (see genrec.model.backbone and docs/sft.md)."""

    # "scratch" builds a small Qwen2 from the sizes below; otherwise a local directory
    # holding a pretrained Hugging Face checkpoint (never a hub name: nothing is downloaded).
    backbone: str = "scratch"
    # Scratch model sizes (ignored for a pretrained backbone).
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    # Size of the byte-level BPE vocabulary trained with `tokenizers` on the item texts for
    # the scratch model, special tokens and the 256 byte symbols included (SID tokens come on top).
    text_vocab_size: int = 2000
    # LoRA (PEFT) on a pretrained backbone; 0 trains every weight.
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Scratch model: attention dropout and residual dropout (embeddings, attention and MLP outputs).
    dropout: float = 0.1
    # A vector per item added at the last SID token of each item in the input
    # (genrec.model.item_embedding): the model reads item IDs beside their SIDs and still
    # generates SIDs. "none", "learned" (a trained table), "sasrec" (the run's SASRec item
    # embeddings, frozen, through a trained projection) or "sasrec_states" (those, plus the frozen
    # SASRec's representation of the history up to each item: a hybrid that runs SASRec at
    # inference). Needs collision-free SIDs (sid.collision: dedup).
    item_embedding: str = "none"
    # Training only: the probability that an item occurrence loses its whole vector, so the
    # model keeps reading its SID tokens too.
    item_dropout: float = 0.0
    # "tokens": each history item is its SID tokens in one token sequence (every task and stage).
    # "items": one position per item (the sum of its codes' rows), the next item's SID generated
    # level by level by a depth head (genrec.model.item_layout, docs/sft.md): seqrec only, stages
    # sft and eval, a scratch backbone, trained with SASRec's loop (sft.batch_size windows a batch).
    layout: str = "tokens"

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone must be 'scratch' or a local checkpoint directory")
        _check(
            self.hidden_size % self.num_heads == 0 and self.num_heads % self.num_kv_heads == 0,
            "model.hidden_size must be divisible by model.num_heads, and num_heads by model.num_kv_heads",
        )
        _check(min(self.hidden_size, self.num_layers, self.intermediate_size) >= 1, "model sizes must be >= 1")
        _check(self.text_vocab_size >= 1, f"model.text_vocab_size must be >= 1, got {self.text_vocab_size}")
        _check(self.lora_r >= 0, f"model.lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}")
        _check(self.layout in ("tokens", "items"), f"model.layout must be 'tokens' or 'items', got {self.layout!r}")
        _check(
            self.lora_r == 0 or self.backbone != "scratch",
            "model.lora_r > 0 needs a pretrained model.backbone directory; the scratch model trains every weight",
        )
        _check(0.0 <= self.dropout < 1.0 and 0.0 <= self.lora_dropout < 1.0, "model dropouts must be in [0, 1)")
        _check(
            self.item_embedding in ITEM_EMBEDDINGS,
            f"model.item_embedding must be one of {', '.join(ITEM_EMBEDDINGS)}, got {self.item_embedding!r}",
        )
        _check(0.0 <= self.item_dropout < 1.0, f"model.item_dropout must be in [0, 1), got {self.item_dropout}")


@dataclass
class SFTConfig:
    """Multi-task supervised fine-tuning (stage ``sft``; see genrec.train.sft and docs/sft.md)."""

    # Task name -> mixing weight; see genrec.tasks.TASKS. Weight w draws round(w * n) of the
    # task's n examples per epoch (1 = each once; 0.2 = a fresh fifth every epoch).
    tasks: dict[str, float] = field(default_factory=lambda: {"seqrec": 1.0})
    # AdamW peak learning rate and weight decay (decay on matrices only).
    lr: float = 1e-3
    weight_decay: float = 0.01
    # Padded tokens per batch and process (examples are grouped by length to waste little).
    batch_tokens: int = 4096
    max_epochs: int = 50
    # Linear warmup, then "cosine" or "linear" decay to 0 over max_epochs, or "constant".
    warmup_steps: int = 100
    schedule: str = "cosine"
    # Early stopping: stop after this many evaluations without a better valid NDCG@10.
    patience: int = 5
    eval_every: int = 1
    # Valid users sampled (once, from the seed) for early stopping (0 = all).
    eval_users: int = 1000
    # Wall-clock budget of training in minutes (0 = none): no epoch starts that would overrun it.
    max_minutes: float = 0.0
    grad_clip: float = 1.0
    # seqrec windows start every window_stride items from the end (0 = data.max_history):
    # each target then sees at least max_history - window_stride + 1 items of history.
    window_stride: int = 0
    # titles2sid: how many recent items' titles form the prompt.
    text_history: int = 10
    # Cap on the tokens of one item text or title inside any task.
    max_text_tokens: int = 48
    # "auto" (bf16 on a GPU that supports it, else none), "no", "bf16" or "fp16".
    mixed_precision: str = "auto"
    # Knowledge distillation from the run's SASRec (stage sasrec) into the seqrec targets:
    # loss = CE + distill * tau^2 * KL(SASRec's per-SID-level distribution || the model's),
    # tau = distill_temperature (genrec.train.distill, docs/sft.md). 0 trains on labels alone.
    distill: float = 0.0
    distill_temperature: float = 1.0
    # Exponential moving average of the trainable weights (0 = off): after every optimizer step
    # ema <- d * ema + (1 - d) * weights, d = min(ema_decay, (1 + step) / (10 + step)). Valid
    # NDCG@10, the kept best weights and the saved model are the average's (docs/sft.md).
    ema_decay: float = 0.0
    # The softmax of each SID token, in the loss and then in every score of the saved model
    # (genrec.model.sid_softmax): "vocab" over the whole vocabulary, "trie" over the codes the
    # item trie allows after the SID's prefix (docs/sft.md).
    sid_softmax: str = "vocab"
    # model.layout: items only: training windows per batch (the token layout batches by tokens).
    batch_size: int = 256
    # model.layout: items only (the token layout has `schedule`): the first lr_drops times
    # patience runs out, go back to the best weights and multiply the learning rate by
    # lr_drop_factor instead of stopping (genrec.train.epochs).
    lr_drops: int = 0
    lr_drop_factor: float = 0.1

    def __post_init__(self) -> None:
        _check(bool(self.tasks), "sft.tasks must name at least one task, e.g. {seqrec: 1.0}")
        _check(
            all(w >= 0 for w in self.tasks.values()) and any(w > 0 for w in self.tasks.values()),
            f"sft.tasks weights must be >= 0 with at least one > 0, got {self.tasks}",
        )
        _check(self.lr > 0 and self.weight_decay >= 0, "sft.lr must be > 0 and sft.weight_decay >= 0")
        _check(self.batch_tokens >= 16, f"sft.batch_tokens must be >= 16, got {self.batch_tokens}")
        _check(
            self.max_epochs >= 1 and self.eval_every >= 1 and self.patience >= 1,
            "sft.max_epochs, sft.eval_every and sft.patience must be >= 1",
        )
        _check(self.warmup_steps >= 0, f"sft.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.sid_softmax in ("vocab", "trie"),
            f"sft.sid_softmax must be 'vocab' or 'trie', got {self.sid_softmax!r}",
        )
        _check(
            self.schedule in ("cosine", "linear", "constant"),
            f"sft.schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}",
        )
        _check(
            self.eval_users >= 0 and self.max_minutes >= 0 and self.grad_clip >= 0,
            "sft.eval_users, sft.max_minutes and sft.grad_clip must be >= 0",
        )
        _check(
            self.window_stride >= 0, f"sft.window_stride must be >= 0 (0 = data.max_history), got {self.window_stride}"
        )
        _check(self.lr_drops >= 0, f"sft.lr_drops must be >= 0, got {self.lr_drops}")
        _check(0 < self.lr_drop_factor < 1, f"sft.lr_drop_factor must be in (0, 1), got {self.lr_drop_factor}")
        _check(
            self.text_history >= 1 and self.max_text_tokens >= 1,
            "sft.text_history and sft.max_text_tokens must be >= 1",
        )
        _check(self.distill >= 0, f"sft.distill must be >= 0 (0 = no distillation), got {self.distill}")
        _check(self.distill_temperature > 0, f"sft.distill_temperature must be > 0, got {self.distill_temperature}")
        _check(0 <= self.ema_decay < 1, f"sft.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _check(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            f"sft.mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}",
        )


@dataclass
class DecodeConfig:
    """Trie-constrained beam search."""

    num_beams: int = 20
    batch_size: int = 64


@dataclass
class RLConfig:
    """GRPO-family post-training from the SFT checkpoint (stage ``rl``); see docs/rl.md."""

    # Reward name -> weight; see genrec.train.rewards.REWARDS. "rank" (MiniOneRec's
    # rank-aware reward) already includes the exact hit.
    rewards: dict[str, float] = field(default_factory=lambda: {"rank": 1.0})
    # "grpo" (group-normalised) or "bgae" (GREAM's bonus-calibrated, for sparse successes).
    advantage: str = "grpo"
    # BGAE's K: the subset size of its pass@K-style success estimate.
    bgae_k: int = 4
    # What divides the group-centred rewards (TRL's scale_rewards): "group" (the group's std,
    # GRPO), "batch" (the std of all the step's rewards: a group whose rewards barely differ
    # moves the model little) or "none" (Dr. GRPO).
    scale_rewards: str = "group"
    # DAPO dynamic sampling: drop groups whose rewards are all equal (they have zero advantage).
    dynamic_sampling: bool = True
    # "grpo" (sequence mean, then batch mean), "dapo" (token mean over the batch) or "gspo"
    # (sequence-level importance ratio; use a small clip_eps such as 3e-4), or "listwise": the
    # cross-entropy from the group's KL-regularised optimum softmax(ref + rewards) to the policy's
    # softmax over the group (genrec.train.losses; the reward weights act as 1 / beta; needs the
    # reference model, which it builds whatever kl_coef; advantages and clipping are unused).
    loss: str = "dapo"
    # "beam" (the group is the beams of a constrained beam search, in beam order) or
    # "sample" (group_size constrained samples at `temperature`).
    rollout: str = "beam"
    group_size: int = 16
    temperature: float = 1.0
    lr: float = 5e-5
    weight_decay: float = 0.0
    # KL penalty to the frozen SFT model (k3 estimator); 0 skips the reference model.
    kl_coef: float = 1e-3
    # Clip range of the importance ratio; clip_eps_high 0 means the same as clip_eps.
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0
    # Dual clip (> 1, e.g. 10 as in GREAM) bounds the loss of negative-advantage tokens; 0 disables.
    dual_clip: float = 0.0
    # Gradient steps on each rollout batch (TRL's num_iterations); ratios differ from 1 only when > 1.
    updates_per_rollout: int = 1
    # Prompts per rollout batch, and per forward/backward chunk (0 = the whole batch).
    batch_size: int = 32
    micro_batch_size: int = 0
    grad_clip: float = 1.0
    # Rollout batches (each followed by updates_per_rollout optimiser steps).
    steps: int = 200
    # "targets": the last targets_per_user training positions of each user, each with its
    # history and its true next item. "histories": each user's whole training part as one
    # unlabelled prompt (no target), for rewards that need none (TARGET_FREE_REWARDS: trm,
    # trm_logp, valid): SASRec never trained on what follows it, so its scores there are
    # its generalisation, not its memory of a training target.
    prompts: str = "targets"
    # Training prompts per user: the last this-many training positions, each with its history.
    targets_per_user: int = 3
    # Evaluate valid NDCG@10 every this many steps (and at step 0); the best model is kept.
    eval_every: int = 50
    # Valid users sampled for that evaluation (0 = all).
    eval_users: int = 1000
    # Save a resumable checkpoint every this many steps.
    save_every: int = 10
    # Wall-clock budget for training in minutes (0 = none).
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        _check(self.advantage in ("grpo", "bgae"), f"rl.advantage must be 'grpo' or 'bgae', got {self.advantage!r}")
        _check(
            self.scale_rewards in ("group", "batch", "none"),
            f"rl.scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}",
        )
        _check(
            self.loss in ("grpo", "dapo", "gspo", "listwise"),
            f"rl.loss must be 'grpo', 'dapo', 'gspo' or 'listwise', got {self.loss!r}",
        )
        _check(self.rollout in ("beam", "sample"), f"rl.rollout must be 'beam' or 'sample', got {self.rollout!r}")
        _check(
            self.prompts in ("targets", "histories"),
            f"rl.prompts must be 'targets' or 'histories', got {self.prompts!r}",
        )
        _check(bool(self.rewards), "rl.rewards must name at least one reward with its weight, e.g. {rank: 1.0}")
        _check(self.group_size >= 2, f"rl.group_size must be >= 2 (advantages compare a group), got {self.group_size}")
        _check(self.temperature > 0, f"rl.temperature must be > 0, got {self.temperature}")
        _check(self.lr > 0 and self.kl_coef >= 0, "rl.lr must be > 0 and rl.kl_coef >= 0")
        _check(self.clip_eps > 0 and self.clip_eps_high >= 0, "rl.clip_eps must be > 0 and rl.clip_eps_high >= 0")
        _check(self.dual_clip == 0 or self.dual_clip > 1, f"rl.dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        _check(self.bgae_k >= 1, f"rl.bgae_k must be >= 1, got {self.bgae_k}")
        _check(
            min(self.updates_per_rollout, self.batch_size, self.steps, self.targets_per_user) >= 1,
            "rl.updates_per_rollout, rl.batch_size, rl.steps and rl.targets_per_user must be >= 1",
        )
        _check(
            self.micro_batch_size >= 0 and self.eval_users >= 0, "rl.micro_batch_size and rl.eval_users must be >= 0"
        )
        _check(self.eval_every >= 1 and self.save_every >= 1, "rl.eval_every and rl.save_every must be >= 1")


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
    interests: InterestsConfig = field(default_factory=InterestsConfig)
    rldi: RLDIConfig = field(default_factory=RLDIConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    trm: TRMConfig = field(default_factory=TRMConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    gream: GREAMConfig = field(default_factory=GREAMConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir is required: set it in the YAML or pass run_dir=PATH")
        # Their answers hold several SIDs generated one token at a time, which would get no item
        # vector at inference while teacher forcing gives them one (genrec.model.item_embedding).
        text_stages = [s for s in self.stages if s in ("gream_sft", "agent_sft")]
        _check(
            self.model.item_embedding == "none" or not text_stages,
            f"model.item_embedding={self.model.item_embedding} works with the seqrec recommender only; "
            f"set it to none for the stage {text_stages[0] if text_stages else ''}",
        )
        # Their rationales and answers hold SIDs sampled as free text, from the full-vocabulary
        # softmax, which the trie softmax does not train (genrec.model.sid_softmax).
        _check(
            self.sft.sid_softmax == "vocab" or not text_stages,
            f"sft.sid_softmax={self.sft.sid_softmax} works with the seqrec recommender only; "
            f"set it to vocab for the stage {text_stages[0] if text_stages else ''}",
        )
        if self.model.layout == "items":
            self._check_item_layout()
        else:
            _check(
                self.sft.lr_drops == 0,
                "sft.lr_drops works with model.layout=items; the token layout decays by sft.schedule",
            )

    def _check_item_layout(self) -> None:
        """What ``model.layout: items`` supports: SFT on seqrec from scratch and its evaluation (genrec.model.item_layout)."""
        token_stages = ("rl", "gream_sft", "gream_eval", "gream_rl", "agent_sft", "agent_eval", "agent_rl")
        bad = [s for s in self.stages if s in token_stages]
        _check(not bad, f"model.layout=items supports the stages sft and eval, not {bad[0] if bad else ''}")
        m, sft = self.model, self.sft
        _check(m.backbone == "scratch", "model.layout=items needs model.backbone: scratch")
        _check(m.lora_r == 0, "model.layout=items trains every weight: set model.lora_r to 0")
        _check(
            m.item_embedding in ("none", "sasrec"),
            f"model.layout=items reads model.item_embedding none or sasrec, got {m.item_embedding!r}",
        )
        _check(m.item_dropout == 0.0, "model.layout=items has no model.item_dropout: set it to 0")
        _check(
            set(sft.tasks) == {"seqrec"}, f"model.layout=items trains the seqrec task alone, got sft.tasks {sft.tasks}"
        )
        unsupported = {"sft.distill": sft.distill != 0.0, "sft.ema_decay": sft.ema_decay != 0.0}
        unsupported["sft.sid_softmax"] = sft.sid_softmax != "vocab"  # its depth head always renormalises on the trie
        named = [k for k, on in unsupported.items() if on]
        _check(not named, f"model.layout=items does not support {named[0] if named else ''}: leave it at its default")
        _check(sft.batch_size >= 1, f"sft.batch_size must be >= 1, got {sft.batch_size}")


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
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
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


def _merge(base: dict, extra: dict, depth: int = 0) -> dict:
    """``extra`` over ``base``: sections (the top level) merge key by key; any value inside a
    section replaces the old one whole, mappings included, so ``rl.rewards={exact: 1.0}``
    means exactly that reward and not the config's rewards plus it."""
    out = dict(base)
    for k, v in extra.items():
        merge = depth == 0 and isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v, depth + 1) if merge else v
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
