"""The ``agent`` config section: DeepRec's multi-turn protocol, its warm-up data and its two-stage RL."""

from __future__ import annotations

from dataclasses import dataclass, field

from genrec.errors import check as _check


@dataclass
class AgentConfig:
    """DeepRec (docs/deeprec.md). The TRM it calls is the ``trm`` section's; the LLM is ``model``."""

    # Tool calls the LLM may make before it must answer (DeepRec: 8).
    max_turns: int = 3
    # Candidates the TRM returns per call (DeepRec: 20), shown as SID + title.
    retrieve_n: int = 10
    # Title tokens shown per candidate in the tool's answer.
    title_tokens: int = 6
    # Token budget of one turn's generation (reasoning + the tool call).
    turn_tokens: int = 32
    # Warm-up trajectories: the last this-many training positions per user (0 = all with
    # at least min_history items before them).
    trajectories_per_user: int = 5
    min_history: int = 3
    # Labels counted in the first turn's evidence, and kept as its preference.
    evidence_labels: int = 3
    preference_labels: int = 2
    # A label on more than this share of the items says nothing about a user.
    max_label_share: float = 0.5
    # Items in the answer list of a warm-up trajectory.
    answer_items: int = 5
    # The final ranking of the retrieved candidates: the LLM's log-probability of each one's SID
    # plus trm_weight x the TRM's log-probability of it (its softmax over the catalogue for the
    # history, no preference). 0 = the LLM alone, as in DeepRec; 1 = the product of the two.
    trm_weight: float = 0.0
    # Sampling temperature of the turns at evaluation (0 = greedy) and in RL rollouts.
    eval_temperature: float = 0.0
    rollout_temperature: float = 1.0
    # RL: trajectories per prompt (the group of the baseline), prompts per step.
    group_size: int = 4
    batch_size: int = 16
    lr: float = 5e-5
    # Stage 1 learns to interact (format, calls, diversity), stage 2 to recommend (format,
    # outcome, recall); {name: weight} over genrec.agent.rewards.REWARDS.
    stage1_rewards: dict[str, float] = field(default_factory=lambda: {"format": 1.0, "calls": 1.0, "diversity": 1.0})
    stage1_steps: int = 10
    stage2_rewards: dict[str, float] = field(default_factory=lambda: {"format": 1.0, "outcome": 1.0, "recall": 0.5})
    stage2_steps: int = 30
    # Prompts whose target the TRM ranks below this with no preference are dropped from RL
    # (DeepRec: 100); 0 keeps all.
    trm_top: int = 100
    # Valid users for RL's keep-the-best check, and how often.
    eval_users: int = 200
    eval_every: int = 10
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        from genrec.agent.rewards import REWARDS

        _check(self.max_turns >= 1, f"agent.max_turns must be >= 1, got {self.max_turns}")
        _check(self.retrieve_n >= 1, f"agent.retrieve_n must be >= 1, got {self.retrieve_n}")
        _check(self.title_tokens >= 0 and self.turn_tokens >= 4, "agent.title_tokens >= 0 and agent.turn_tokens >= 4")
        _check(self.trajectories_per_user >= 0, "agent.trajectories_per_user must be >= 0 (0 = all positions)")
        _check(self.min_history >= 1, f"agent.min_history must be >= 1, got {self.min_history}")
        _check(
            1 <= self.preference_labels <= self.evidence_labels,
            "agent.preference_labels must be >= 1 and <= agent.evidence_labels",
        )
        _check(0 < self.max_label_share <= 1, f"agent.max_label_share must be in (0, 1], got {self.max_label_share}")
        _check(self.answer_items >= 1, f"agent.answer_items must be >= 1, got {self.answer_items}")
        _check(min(self.eval_temperature, self.rollout_temperature) >= 0, "agent temperatures must be >= 0")
        _check(self.trm_weight >= 0, f"agent.trm_weight must be >= 0, got {self.trm_weight}")
        _check(self.rollout_temperature > 0, "agent.rollout_temperature must be > 0: RL samples its trajectories")
        _check(self.group_size >= 2, f"agent.group_size must be >= 2 (the group baseline), got {self.group_size}")
        _check(self.batch_size >= 1 and self.lr > 0, "agent.batch_size must be >= 1 and agent.lr > 0")
        for key in ("stage1_rewards", "stage2_rewards"):
            unknown = [r for r in getattr(self, key) if r not in REWARDS]
            _check(not unknown, f"agent.{key}: unknown reward {unknown[:1]}; rewards: {', '.join(REWARDS)}")
        _check(min(self.stage1_steps, self.stage2_steps) >= 0, "agent.stage1_steps and stage2_steps must be >= 0")
        _check(self.trm_top >= 0 and self.eval_users >= 0, "agent.trm_top and agent.eval_users must be >= 0")
        _check(self.eval_every >= 1, f"agent.eval_every must be >= 1, got {self.eval_every}")
