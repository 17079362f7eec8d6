import math

import numpy as np
import pytest

from genrec.eval.metrics import bootstrap_ci, compute_metrics, hit_rate_at_k, ndcg_at_k, target_ranks


def test_target_ranks_hand_computed():
    ranked = np.array([[4, 2, 9], [1, 3, 5], [7, 8, 6]])
    assert target_ranks(ranked, np.array([2, 1, 0])).tolist() == [1, 0, -1]


def test_hr_and_ndcg_hand_computed():
    ranks = np.array([0, 1, 4, -1])
    assert hit_rate_at_k(ranks, 1) == 0.25
    assert hit_rate_at_k(ranks, 5) == 0.75
    # ndcg@5 = (1/log2(2) + 1/log2(3) + 1/log2(6) + 0) / 4
    expected = (1.0 + 1 / math.log2(3) + 1 / math.log2(6)) / 4
    assert ndcg_at_k(ranks, 5) == pytest.approx(expected)
    # rank 4 is outside top-2
    assert ndcg_at_k(ranks, 2) == pytest.approx((1.0 + 1 / math.log2(3)) / 4)


def test_compute_metrics_keys_and_empty():
    m = compute_metrics(np.array([2]), [1, 5])
    assert m == {"hr@1": 0.0, "ndcg@1": 0.0, "hr@5": 1.0, "ndcg@5": pytest.approx(0.5)}
    assert compute_metrics(np.array([], dtype=int), [10]) == {"hr@10": 0.0, "ndcg@10": 0.0}


def test_bootstrap_interval_contains_mean_and_is_reproducible():
    ranks = np.array([0, -1, 3, 12, -1, 1, 0, 7] * 10)
    ci = bootstrap_ci(ranks, [10], n_resamples=200, seed=3)
    mean = hit_rate_at_k(ranks, 10)
    assert ci["hr@10"][0] <= mean <= ci["hr@10"][1]
    assert ci == bootstrap_ci(ranks, [10], n_resamples=200, seed=3)
