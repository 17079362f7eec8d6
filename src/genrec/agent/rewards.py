"""DeepRec's hierarchical rewards and its advantage: pure functions of per-trajectory columns.

Each reward takes the columns it needs as keyword arguments (arrays over trajectories) and
ignores the rest through ``**columns``, as ``genrec.train.rewards`` does:

- ``well_formed`` (n,) bool: every turn parsed, at least one call, and the LLM closed its
  reasoning itself;
- ``num_calls`` (n,) int: the well-formed tool calls;
- ``pref_cosine`` (n,) float: the mean pairwise cosine of the calls' preference embeddings
  (NaN with fewer than two calls);
- ``target_retrieved`` (n,) bool: the target is among the retrieved candidates;
- ``target_rank`` (n,) int: the target's 0-based rank in the final list, -1 when absent.

Process rewards (interaction): ``format``, ``calls``, ``diversity``, ``recall``; outcome
reward: ``outcome``. Constants are DeepRec's (METHODS.md). Stage 1 of the RL schedule uses
the process rewards, stage 2 adds the outcome (``agent.stage1_rewards``, ``stage2_rewards``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def format_reward(well_formed, **columns) -> np.ndarray:
    """F = 0 for a well-formed trajectory, -1 on any violation.

    >>> format_reward(np.array([True, False])).tolist()
    [0.0, -1.0]
    """
    return np.where(np.asarray(well_formed, dtype=bool), 0.0, -1.0)


def calls_reward(num_calls, **columns) -> np.ndarray:
    """T = 0.5 (min(n, 3) - 1) for n > 1 calls, else 0: more than one call pays, up to three.

    >>> calls_reward(np.array([0, 1, 2, 3, 5])).tolist()
    [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    n = np.asarray(num_calls, dtype=np.float64)
    return np.where(n > 1, 0.5 * (np.minimum(n, 3) - 1), 0.0)


def diversity_reward(pref_cosine, num_calls, **columns) -> np.ndarray:
    """D = 0.2 (1 - mean pairwise cosine of the preferences) with two or more calls, else 0.

    >>> diversity_reward(np.array([0.5, 1.0, np.nan]), np.array([2, 3, 1])).tolist()
    [0.1, 0.0, 0.0]
    """
    cos = np.nan_to_num(np.asarray(pref_cosine, dtype=np.float64), nan=1.0)
    return np.where(np.asarray(num_calls) >= 2, 0.2 * (1.0 - cos), 0.0)


def recall_reward(target_retrieved, **columns) -> np.ndarray:
    """1 when some call retrieved the target, else 0 (the process reward of the retrieval).

    >>> recall_reward(np.array([True, False])).tolist()
    [1.0, 0.0]
    """
    return np.asarray(target_retrieved, dtype=np.float64)


def outcome_reward(target_rank, well_formed, **columns) -> np.ndarray:
    """O = 1 + 0.2 (10 - i) when the target is at 0-based rank i < 10 of a well-formed answer, else 0.

    >>> outcome_reward(np.array([0, 9, 10, -1, 0]), np.array([True, True, True, True, False])).tolist()
    [3.0, 1.2, 0.0, 0.0, 0.0]
    """
    i = np.asarray(target_rank)
    hit = (i >= 0) & (i < 10) & np.asarray(well_formed, dtype=bool)
    return np.where(hit, 1.0 + 0.2 * (10 - i), 0.0)


REWARDS = {
    "format": format_reward,
    "calls": calls_reward,
    "diversity": diversity_reward,
    "recall": recall_reward,
    "outcome": outcome_reward,
}


def combine(weights: Mapping[str, float], **columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the weighted sum (n,), each named component (n,))."""
    parts = {name: REWARDS[name](**columns) for name in weights}
    total = sum((w * parts[name] for name, w in weights.items()), np.zeros(len(columns["num_calls"])))
    return total, parts


def group_baseline_advantages(rewards) -> np.ndarray:
    """REINFORCE++ with a group baseline: A = R - mean of its group, then whitened over the batch.

    ``rewards`` (B, G), a row per prompt. A batch whose advantages are all 0 (every group
    all-equal) stays exactly 0, never NaN.

    >>> group_baseline_advantages(np.array([[1.0, 0.0], [2.0, 2.0]])).round(4).tolist()
    [[1.4142, -1.4142], [0.0, 0.0]]
    """
    r = np.asarray(rewards, dtype=np.float64)
    a = r - r.mean(axis=1, keepdims=True)
    std = a.std()
    return a / std if std > 1e-8 else np.zeros_like(a)
