"""Advantage estimators against hand-computed literal values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genrec.train.advantages import (
    bgae_advantages,
    bgae_bonus,
    compute_advantages,
    grpo_advantages,
    informative_groups,
)


def test_grpo_literal():
    # mean 0.25, sample std sqrt(0.25) = 0.5 (ddof=1: (0.5625 + 3 * 0.0625) / 3).
    adv = grpo_advantages(np.array([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    np.testing.assert_allclose(adv, [[1.5, -0.5, -0.5, -0.5]])
    adv = grpo_advantages(np.array([[2.0, 4.0]]), eps=0.0)
    np.testing.assert_allclose(adv, [[-1 / math.sqrt(2), 1 / math.sqrt(2)]])


def test_equal_rewards_give_zero_never_nan():
    r = np.array([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-0.39, -0.39, -0.39]])
    for adv in (grpo_advantages(r), bgae_advantages(r, r == 1.0)):
        assert np.isfinite(adv).all()
        assert (adv == 0.0).all()
    assert (grpo_advantages(np.array([[3.0]])) == 0.0).all()  # a group of one


def test_bgae_bonus_literal():
    # n = 10, c = 1, K = 4: rho = 1 - C(9,4)/C(10,4) = 1 - 126/210 = 0.4, sigma = sqrt(0.24).
    sigma = math.sqrt(0.24)
    b_plus, b_minus = bgae_bonus(10, 1)
    assert b_plus == pytest.approx(0.6 / (sigma + 1e-6))
    assert b_minus == pytest.approx((0.6 - 56 / 84) / (sigma + 1e-6))  # C(8,3)/C(9,3)
    assert (round(b_plus, 4), round(b_minus, 4)) == (1.2247, -0.1361)
    # n = 10, c = 3: rho = 1 - C(7,4)/C(10,4) = 1 - 35/210; b- uses C(6,3)/C(9,3) = 20/84.
    rho = 1 - 35 / 210
    sigma = math.sqrt(rho * (1 - rho))
    b_plus, b_minus = bgae_bonus(10, 3)
    assert b_plus == pytest.approx((1 - rho) / (sigma + 1e-6))
    assert b_minus == pytest.approx((1 - rho - 20 / 84) / (sigma + 1e-6))
    # No bonus at c = 0 or c = n; rho = 1 (n - c < K) gives a zero bonus, not a division blow-up.
    assert bgae_bonus(10, 0) == (0.0, 0.0) and bgae_bonus(10, 10) == (0.0, 0.0)
    assert bgae_bonus(10, 8) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bgae_bonus(4, 5)


def test_bgae_advantages_literal():
    r = np.array([[1.0] + [0.0] * 9, [0.0] * 10])
    hits = r == 1.0
    adv = bgae_advantages(r, hits)
    grpo = 0.9 / math.sqrt(0.1)  # mean 0.1, sample std sqrt(0.9 / 9)
    np.testing.assert_allclose(adv[0, 0], grpo + 1.2247, atol=1e-4)
    np.testing.assert_allclose(adv[0, 1:], -0.1 / math.sqrt(0.1) - 0.1361, atol=1e-4)
    assert (adv[1] == 0).all()
    with pytest.raises(ValueError, match="same shape"):
        bgae_advantages(r, hits[:, :3])


def test_dynamic_sampling_and_dispatch():
    r = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    assert informative_groups(r).tolist() == [True, False, False]
    np.testing.assert_allclose(compute_advantages("grpo", r, r == 1), grpo_advantages(r))
    with pytest.raises(ValueError, match="rl.advantage"):
        compute_advantages("ppo", r, r == 1)


def test_scale_rewards_literal():
    # Two groups whose rewards differ by 1.0 and by 0.01: "group" gives both the same unit
    # advantages; "batch" keeps the second 100x smaller; "none" leaves the centred rewards.
    r = np.array([[1.0, 0.0], [0.505, 0.495]])
    np.testing.assert_allclose(grpo_advantages(r, scale="group"), [[0.7071, -0.7071]] * 2, atol=1e-4)
    batch_std = np.std([1.0, 0.0, 0.505, 0.495], ddof=1)
    np.testing.assert_allclose(grpo_advantages(r, scale="batch"), [[0.5, -0.5], [0.005, -0.005]] / batch_std, rtol=1e-5)
    np.testing.assert_allclose(grpo_advantages(r, scale="none"), [[0.5, -0.5], [0.005, -0.005]], atol=1e-9)
    # Equal rewards stay exactly zero under every scale, and BGAE passes its scale on.
    for scale in ("group", "batch", "none"):
        assert (grpo_advantages(np.full((2, 3), 0.3), scale=scale) == 0).all()
    hits = r == 1.0
    np.testing.assert_allclose(
        compute_advantages("bgae", r, hits, scale="none") - grpo_advantages(r, scale="none"),
        compute_advantages("bgae", r, hits) - grpo_advantages(r),
    )
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(r, scale="std")
