"""Rewards against hand-computed literal values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genrec.train.rewards import (
    REWARDS,
    combine_rewards,
    exact_reward,
    prefix_match_levels,
    prefix_reward,
    rank_reward,
    rsvr_reward,
    semantic_reward,
    trm_logp_reward,
    trm_reward,
    valid_penalty_reward,
    valid_reward,
)

# Two prompts, four completions each, 3-level SIDs. Prompt 0's target is item 5 = (1, 2, 3),
# generated at beam 2; prompt 1's target is item 9 = (4, 4, 4), never generated.
ITEMS = np.array([[7, 8, 5, -1], [1, 2, 3, 0]])
CODES = np.array(
    [
        [[1, 2, 0], [1, 0, 3], [1, 2, 3], [-1, -1, -1]],
        [[4, 4, 0], [4, 0, 4], [0, 4, 4], [4, 4, 1]],
    ]
)
TARGET = np.array([5, 9])
TARGET_CODES = np.array([[1, 2, 3], [4, 4, 4]])
VALID = ITEMS >= 0
COLUMNS = dict(items=ITEMS, codes=CODES, target_item=TARGET, target_codes=TARGET_CODES, valid=VALID)


def test_exact():
    assert exact_reward(**COLUMNS).tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_rank_aware_sign_and_values():
    s = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)  # 2.5616...
    r = rank_reward(**COLUMNS)
    # Prompt 0 hits at beam 2: the hit gets 1, every wrong beam (padding included) a negative
    # penalty, largest at the top beam. Prompt 1 has no hit: all zeros.
    expected0 = [-1 / s, -(1 / math.log2(3)) / s, 1.0, -(1 / math.log2(5)) / s]
    np.testing.assert_allclose(r[0], expected0)
    np.testing.assert_allclose(r[0], [-0.390380, -0.246302, 1.0, -0.168128], atol=1e-6)
    assert r[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (r[0][[0, 1, 3]] < 0).all()


def test_rank_aware_hit_first_is_penalised_least():
    first = rank_reward(np.array([[5, 1, 2]]), np.array([5]))
    last = rank_reward(np.array([[1, 2, 5]]), np.array([5]))
    assert first.sum() > last.sum()


def test_prefix_levels_and_rsvr():
    assert prefix_match_levels(CODES, TARGET_CODES).tolist() == [[2, 1, 3, 0], [2, 1, 0, 2]]
    assert rsvr_reward(**COLUMNS).tolist() == [[0.707, 0.5, 1.0, 0.0], [0.707, 0.5, 0.0, 0.707]]


def test_prefix_reward_is_lcp_over_three_levels():
    codes = np.array([[[1, 2, 3, 7], [1, 2, 9, 7], [1, 5, 3, 7], [-1, -1, -1, -1]]])
    items = np.array([[4, 5, 6, -1]])
    got = prefix_reward(items, codes, np.array([[1, 2, 3, 0]]))
    # The 4th (collision) level is not counted: item 4 shares the 3 levels, then 2, then 1.
    assert got.round(4).tolist() == [[1.0, 0.6667, 0.3333, 0.0]]
    assert prefix_reward(items[:, :2], codes[:, :2, :2], np.array([[1, 2]])).tolist() == [[1.0, 1.0]]


def test_rsvr_caps_at_four_levels():
    codes = np.array([[[1, 1, 1, 1, 9], [1, 1, 1, 9, 9]]])
    r = rsvr_reward(np.array([[3, 4]]), codes, np.array([0]), np.array([[1, 1, 1, 1, 1]]))
    assert r.tolist() == [[0.95, 0.866]]


def test_semantic():
    emb = np.array([[3.0, 4.0], [4.0, -3.0], [0.0, 1.0]])  # items 0, 1, 2
    r = semantic_reward(np.array([[0, 1, 2, -1]]), np.array([0]), item_emb=emb)
    np.testing.assert_allclose(r, [[1.0, 0.0, 0.8, 0.0]])
    with pytest.raises(ValueError, match="item_emb"):
        semantic_reward(np.array([[0]]), np.array([0]))


def test_trm_probs_and_log_probs():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    items = np.array([[1, 2], [0, -1]])
    assert trm_reward(items, trm_probs=probs).tolist() == [[0.6, 0.3], [0.5, 0.0]]
    np.testing.assert_allclose(trm_reward(items, trm_log_probs=np.log(probs)), [[0.6, 0.3], [0.5, 0.0]])
    with pytest.raises(ValueError, match="exactly one"):
        trm_reward(items)


def test_trm_logp_is_the_log_probability_and_the_rows_floor_for_no_item():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    items = np.array([[1, 2], [0, -1]])
    expected = [[math.log(0.6), math.log(0.3)], [math.log(0.5), math.log(0.25)]]
    np.testing.assert_allclose(trm_logp_reward(items, trm_probs=probs), expected)
    np.testing.assert_allclose(trm_logp_reward(items, trm_log_probs=np.log(probs)), expected)
    with pytest.raises(ValueError, match="exactly one"):
        trm_logp_reward(items)


def test_validity():
    assert valid_reward(**COLUMNS).tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert valid_penalty_reward(**COLUMNS).tolist() == [[0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]


def test_combine_weights_components_and_errors():
    total, parts = combine_rewards({"exact": 2.0, "rsvr": 0.5}, COLUMNS)
    np.testing.assert_allclose(total, [[0.3535, 0.25, 2.5, 0.0], [0.3535, 0.25, 0.0, 0.3535]])
    assert set(parts) == {"exact", "rsvr"}
    with pytest.raises(ValueError, match=r"rl.rewards.nope: unknown reward"):
        combine_rewards({"nope": 1.0}, COLUMNS)
    with pytest.raises(ValueError, match="shape"):
        combine_rewards({"bad": 1.0}, COLUMNS, {"bad": lambda items, **_: np.zeros(3)})
    # A caller's own reward composes with the built-in ones through the registry.
    total, _ = combine_rewards(
        {"exact": 1.0, "mine": 1.0}, COLUMNS, {**REWARDS, "mine": lambda items, **_: items * 0 + 1.0}
    )
    assert total.tolist() == [[1.0, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_interest_reward_is_the_clipped_cosine_of_positive_interest_profiles():
    from genrec.train.rewards import interest_reward

    user = np.array([[3.0, 0.0], [0.0, 0.0]])  # user 1 has no positive interest
    item = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])  # item 3 has none
    items = np.array([[0, 1, 2, 3, -1], [0, 1, 2, 3, -1]])
    got = interest_reward(items, user_interest_emb=user, item_interest_emb=item)
    assert got.dtype == np.float64 and got.shape == (2, 5)
    assert np.round(got, 4).tolist() == [[1.0, 0.7071, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="user_interest_emb"):
        interest_reward(items, item_interest_emb=item)


def test_quality_reward_pays_the_targets_quality_on_an_exact_hit():
    from genrec.train.rewards import combine_rewards, quality_reward

    q = np.array([0.0, 0.25, 0.5, 1.0])
    items, target = np.array([[1, 2, -1], [3, 3, 0]]), np.array([2, 3])
    assert quality_reward(items, target, item_quality=q).tolist() == [[0.0, 0.5, 0.0], [1.0, 1.0, 0.0]]
    # DeepInterestGR's R = 1[exact] + lambda_valid 1[valid] + 0.5 q_target 1[exact] (prefix term left out).
    cols = dict(items=items, target_item=target, valid=items >= 0, item_quality=q)
    total, _ = combine_rewards({"exact": 1.0, "valid": 0.1, "quality": 0.5}, cols)
    assert np.round(total, 4).tolist() == [[0.1, 1.35, 0.0], [1.6, 1.6, 0.1]]
