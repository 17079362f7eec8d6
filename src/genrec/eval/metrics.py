"""Ranking metrics over the full catalogue, one held-out target per user.

Every function is pure. ``rank`` is the 0-based position of the target in the user's
ranked list, or ``-1`` when the target is not in the list (then every metric is 0 for
that user: a list of length ``K_max`` is enough for any ``k <= K_max``).
"""

from __future__ import annotations

import numpy as np


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target in its row of ``ranked`` (U, K), -1 if absent.

    >>> target_ranks(np.array([[3, 1, 2], [5, 6, 7]]), np.array([2, 9])).tolist()
    [2, -1]
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    hit = ranked == targets[:, None]  # (U, K)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """HR@k = (1/U) sum_u 1[rank_u < k]."""
    ranks = np.asarray(ranks)
    return float(np.mean((ranks >= 0) & (ranks < k))) if len(ranks) else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@k = (1/U) sum_u 1[rank_u < k] / log2(rank_u + 2).

    With one relevant item per user the ideal DCG is 1, so NDCG is the discounted gain
    of the target alone.
    """
    ranks = np.asarray(ranks)
    if not len(ranks):
        return 0.0
    hit = (ranks >= 0) & (ranks < k)
    gains = np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)
    return float(gains.mean())


def per_user_gains(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(hit, ndcg) per user at cut-off k, for bootstrapping."""
    ranks = np.asarray(ranks)
    hit = (ranks >= 0) & (ranks < k)
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)


def compute_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """{"hr@k": ..., "ndcg@k": ...} for every k."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out


def bootstrap_ci(
    ranks: np.ndarray, ks: list[int], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap confidence interval of every metric, resampling users."""
    ranks = np.asarray(ranks)
    if n_resamples <= 0 or not len(ranks):
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ranks), size=(n_resamples, len(ranks)))  # (R, U)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out: dict[str, list[float]] = {}
    for k in ks:
        hit, ndcg = per_user_gains(ranks, k)
        for name, gain in (("hr", hit), ("ndcg", ndcg)):
            means = gain[idx].mean(axis=1)
            out[f"{name}@{k}"] = [float(np.percentile(means, lo)), float(np.percentile(means, hi))]
    return out
