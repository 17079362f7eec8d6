"""Advantage estimators over groups of completions: pure functions of the rewards (B, G).

Row b holds the G completions of one prompt (the beams of its beam search, or its samples).

- :func:`grpo_advantages`: group normalisation, A = (r - mean) / (std + eps), the std of the
  group (GRPO), of the batch, or none (Dr. GRPO): TRL's `scale_rewards`;
- :func:`bgae_advantages`: GREAM's bonus-calibrated group advantage for sparse successes;
- :func:`informative_groups`: DAPO's dynamic sampling, which keeps only groups whose rewards
  are not all equal (such a group has zero advantage everywhere and only dilutes the batch).

A group whose rewards are all equal gets exactly zero advantage, never NaN.
"""

from __future__ import annotations

from math import comb

import numpy as np

ADVANTAGES = ("grpo", "bgae")
SCALES = ("group", "batch", "none")


def informative_groups(rewards) -> np.ndarray:
    """(B,) bool: the groups whose rewards are not all equal.

    >>> informative_groups(np.array([[1.0, 0.0], [0.5, 0.5]])).tolist()
    [True, False]
    """
    r = np.asarray(rewards, dtype=np.float64)
    return (r != r[:, :1]).any(axis=1)


def grpo_advantages(rewards, eps: float = 1e-6, scale: str = "group") -> np.ndarray:
    """A_i = (r_i - mean_j r_j) / (s + eps) within each group (row).

    ``scale`` is TRL's ``scale_rewards``: "group" divides by the group's standard deviation
    (GRPO), "batch" by the standard deviation of all rewards in the batch (so a group whose
    rewards barely differ gets a small advantage instead of a unit one), "none" by 1 (Dr. GRPO).
    Standard deviations are sample ones (ddof = 1), as TRL computes them; a group of one
    completion, or whose rewards are all equal, gets A = 0.

    >>> np.round(grpo_advantages(np.array([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]])), 4).tolist()
    [[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]
    >>> np.round(grpo_advantages(np.array([[1.0, 0.0], [0.6, 0.4]]), scale="batch"), 4).tolist()
    [[1.201, -1.201], [0.2402, -0.2402]]
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (B, G), got shape {r.shape}")
    if scale not in SCALES:
        raise ValueError(f"rl.scale_rewards must be one of {SCALES}, got {scale!r}")
    if r.shape[1] < 2:
        return np.zeros_like(r)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + eps)
    # Equal rewards: the mean can differ from them by rounding, and eps would blow that up.
    return np.where(informative_groups(r)[:, None], centred, 0.0)


def bgae_bonus(n: int, c: int, k: int = 4, eps: float = 1e-6) -> tuple[float, float]:
    """GREAM's bonuses (b+, b-) for a group of n rollouts with c exact hits.

    rho = 1 - C(n-c, K) / C(n, K) (the chance that K of the n rollouts hold a hit);
    sigma = sqrt(rho (1 - rho)); b+ = (1 - rho) / (sigma + eps);
    b- = (1 - rho - C(n-c-1, K-1) / C(n-1, K-1)) / (sigma + eps); both 0 when c = 0 or c = n.
    K is capped at n (a group smaller than K draws all of itself).

    >>> [round(b, 4) for b in bgae_bonus(10, 1)]
    [1.2247, -0.1361]
    """
    if not 0 <= c <= n:
        raise ValueError(f"hits c={c} must be in [0, n={n}]")
    if c == 0 or c == n:
        return 0.0, 0.0
    k = min(k, n)
    rho = 1.0 - comb(n - c, k) / comb(n, k)
    sigma = np.sqrt(rho * (1.0 - rho))
    b_plus = (1.0 - rho) / (sigma + eps)
    b_minus = (1.0 - rho - comb(n - c - 1, k - 1) / comb(n - 1, k - 1)) / (sigma + eps)
    return float(b_plus), float(b_minus)


def bgae_advantages(rewards, hits, k: int = 4, eps: float = 1e-6, scale: str = "group") -> np.ndarray:
    """GREAM's bonus-calibrated group advantage: A_i = GRPO A_i + (b+ if hit_i else b-).

    ``hits`` (B, G) bool marks the exact hits (GREAM's r_i = 1); c = hits per group. The
    bonus rewards groups where successes are rare (small c) more than a plain GRPO
    advantage does, and is 0 when c = 0 or c = n, so such a group with all-equal rewards
    still gets A = 0.

    >>> np.round(bgae_advantages(np.array([[1.0] + [0.0] * 9]), np.array([[True] + [False] * 9])), 4).tolist()
    [[4.0708, -0.4523, -0.4523, -0.4523, -0.4523, -0.4523, -0.4523, -0.4523, -0.4523, -0.4523]]
    """
    r = np.asarray(rewards, dtype=np.float64)
    hits = np.asarray(hits, dtype=bool)
    if hits.shape != r.shape:
        raise ValueError(f"hits {hits.shape} and rewards {r.shape} must have the same shape (B, G)")
    n = r.shape[1]
    bonus = np.array([bgae_bonus(n, int(c), k, eps) for c in hits.sum(axis=1)]).reshape(-1, 2)  # (B, 2): b+, b-
    return grpo_advantages(r, eps, scale) + np.where(hits, bonus[:, :1], bonus[:, 1:])


def compute_advantages(kind: str, rewards, hits, eps: float = 1e-6, k: int = 4, scale: str = "group") -> np.ndarray:
    """Dispatch on ``rl.advantage``: "grpo" or "bgae", with ``rl.scale_rewards`` as ``scale``."""
    if kind == "grpo":
        return grpo_advantages(rewards, eps, scale)
    if kind == "bgae":
        return bgae_advantages(rewards, hits, k, eps, scale)
    raise ValueError(f"rl.advantage must be one of {ADVANTAGES}, got {kind!r}")
