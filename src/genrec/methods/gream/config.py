"""The ``gream`` config section: reasoning chains, the curriculum, and reasoning-mode inference."""

from __future__ import annotations

from dataclasses import dataclass

from genrec.errors import check as _check
from genrec.interests.config import BackendConfig


@dataclass
class GREAMConfig:
    """GREAM's SFT data and inference; SRPO itself is configured in the ``rl`` section (docs/gream.md)."""

    # Training positions per user that get a reasoning chain: the last this-many positions of the
    # training part (0 = every position with at least min_history items before it, as GREAM does).
    chains_per_user: int = 5
    # A chain needs at least this many history items (GREAM: 4 <= t).
    min_history: int = 4
    # Category labels counted in the evidence step, and kept as the user's preferences.
    evidence_labels: int = 3
    preference_labels: int = 2
    # A category label held by more than this share of the items (e.g. "Beauty") says nothing
    # about a user and is ignored.
    max_label_share: float = 0.5
    # Most recent history items in the rewrite line (after denoising).
    rewrite_items: int = 10
    # Epochs over which the curriculum walks through its five stages (evidence, preferences,
    # intent, recommendation, rewrite; see genrec.methods.gream.tasks); 0 trains full chains
    # from the first epoch (no curriculum).
    curriculum_epochs: int = 0
    # co2sid: items co-interacted within this many positions of an item in a training
    # sequence, and how many of the most frequent form the target.
    co_window: int = 3
    co_items: int = 5
    # A teacher LLM that writes the three reasoning steps (an interests-style backend,
    # kind openai or hf); None builds data-derived chains from metadata, history and target.
    teacher: BackendConfig | None = None
    # Cap on teacher calls (0 = one per chain); chains beyond it are data-derived.
    teacher_max_chains: int = 0
    # The call cache of the teacher; empty means <run_dir>/../.cache/gream/calls.sqlite.
    teacher_cache: str = ""
    # Reasoning-mode inference: rationale token budget, and greedy (0) or sampled decoding.
    max_think_tokens: int = 48
    think_temperature: float = 0.0
    # SRPO's rollouts (stage gream_rl): "direct" (trie-constrained SIDs from the seqrec prompt)
    # or "reasoning" (a sampled rationale, then the answer SID; genrec.methods.gream.srpo).
    rl_rollout: str = "direct"

    def __post_init__(self) -> None:
        _check(self.chains_per_user >= 0, f"gream.chains_per_user must be >= 0 (0 = all), got {self.chains_per_user}")
        _check(self.min_history >= 1, f"gream.min_history must be >= 1, got {self.min_history}")
        _check(
            1 <= self.preference_labels <= self.evidence_labels,
            "gream.preference_labels must be >= 1 and <= gream.evidence_labels",
        )
        _check(0 < self.max_label_share <= 1, f"gream.max_label_share must be in (0, 1], got {self.max_label_share}")
        _check(self.rewrite_items >= 1, f"gream.rewrite_items must be >= 1, got {self.rewrite_items}")
        _check(self.curriculum_epochs >= 0, f"gream.curriculum_epochs must be >= 0, got {self.curriculum_epochs}")
        _check(self.co_window >= 1 and self.co_items >= 1, "gream.co_window and gream.co_items must be >= 1")
        if self.teacher is not None:
            _check(
                self.teacher.kind in ("openai", "hf"),
                f"gream.teacher.kind must be openai or hf (an LLM), got {self.teacher.kind!r}; "
                "leave gream.teacher unset for data-derived chains",
            )
        _check(self.teacher_max_chains >= 0, "gream.teacher_max_chains must be >= 0 (0 = no cap)")
        _check(self.max_think_tokens >= 1, f"gream.max_think_tokens must be >= 1, got {self.max_think_tokens}")
        _check(self.think_temperature >= 0, f"gream.think_temperature must be >= 0, got {self.think_temperature}")
        _check(
            self.rl_rollout in ("direct", "reasoning"),
            f"gream.rl_rollout must be 'direct' or 'reasoning', got {self.rl_rollout!r}",
        )
