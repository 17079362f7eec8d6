"""Rewards for RL post-training: pure functions of the rollout batch's columns.

A reward is a callable, as in TRL, that takes the completions and every other column of the
batch as keyword arguments and returns one number per completion. Here the completions of a
prompt come as a group, so every column is an array:

- ``items`` (B, G) int: the generated item_id of each completion, -1 where it is no item
  (beam padding, or a free-text rollout that did not parse to a SID);
- ``codes`` (B, G, L) int: the generated SID codes, -1 where absent;
- ``target_item`` (B,) int and ``target_codes`` (B, L) int: the true next item of each prompt;
- ``valid`` (B, G) bool: the completion is a well-formed SID of a real item;
- any extra column the caller passes (``item_emb``, ``trm_log_probs``, ...), which rewards
  that do not use it ignore through ``**columns``.

Every reward returns a float64 array (B, G). For rank-aware rewards the group must be in
beam order (best first), as ``constrained_beam_search`` returns it. Targets arrive as
columns, never through a lookup keyed by prompt text, so two users with the same history
keep their own targets.

``REWARDS`` maps the names used in ``rl.rewards`` ({name: weight}) to the functions;
:func:`combine_rewards` evaluates the weighted sum and each component.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

RewardFn = Callable[..., np.ndarray]

# GREAM's residual-sensitive partial credit for l = 1, 2, 3, >= 4 leading levels matched.
RSVR_PARTIAL = (0.5, 0.707, 0.866, 0.95)


def exact_reward(items, target_item, **columns) -> np.ndarray:
    """r = 1 if the completion is the target item, else 0.

    >>> exact_reward(np.array([[3, 5, -1]]), np.array([5])).tolist()
    [[0.0, 1.0, 0.0]]
    """
    items = np.asarray(items)
    target = np.asarray(target_item)
    return ((items == target[:, None]) & (items >= 0)).astype(np.float64)


def rank_reward(items, target_item, **columns) -> np.ndarray:
    """MiniOneRec's rank-aware reward: the exact hit plus a penalty on wrong beams ranked high.

    With the group in beam order (position i = 0 is the best beam) and G completions:
    r_i = 1 if completion i is the target; else, only when some completion of the group is
    the target, r_i = -(1/log2(i+2)) / sum_{j<G} 1/log2(j+2); else 0.

    Sign convention: the penalty is negative and largest in magnitude at the top beam; the
    penalties of all G positions sum to -1, and the hit's own position is spared, so a
    group that ranks its hit first is penalised least (-(1 - 1/S), S the sum). A group with
    no hit gets all zeros: every reward equal, no signal (GRPO gives it zero advantage).

    >>> np.round(rank_reward(np.array([[7, 5, 8]]), np.array([5])), 4).tolist()
    [[-0.4693, 1.0, -0.2346]]
    """
    hit = exact_reward(items, target_item)  # (B, G)
    g = hit.shape[1]
    discount = 1.0 / np.log2(np.arange(g) + 2.0)  # (G,)
    penalty = -discount / discount.sum()
    any_hit = hit.any(axis=1, keepdims=True)  # (B, 1)
    return np.where(hit > 0, 1.0, np.where(any_hit, penalty[None, :], 0.0))


def prefix_match_levels(codes, target_codes) -> np.ndarray:
    """Number of leading SID levels each completion shares with its target: (B, G) int.

    >>> prefix_match_levels(np.array([[[1, 2, 3], [1, 9, 3], [4, 2, 3]]]), np.array([[1, 2, 3]])).tolist()
    [[3, 1, 0]]
    """
    codes = np.asarray(codes)
    target = np.asarray(target_codes)
    same = (codes == target[:, None, :]) & (codes >= 0)  # (B, G, L)
    # cumprod stops counting at the first mismatching level.
    return np.cumprod(same, axis=2).sum(axis=2)


def rsvr_reward(items, codes, target_item, target_codes, **columns) -> np.ndarray:
    """GREAM's residual-sensitive verifiable reward (partial credit by shared SID prefix).

    r = 1.0 for the exact item; otherwise, with l the number of leading levels that match
    the target's SID, r = [0.5, 0.707, 0.866, 0.95][min(l, 4) - 1], and r = 0 when l = 0 or
    the completion is no item.

    >>> rsvr_reward(np.array([[5, 6, 7, -1]]), np.array([[[1, 2, 3], [1, 2, 0], [0, 2, 3], [-1, -1, -1]]]),
    ...             np.array([5]), np.array([[1, 2, 3]])).tolist()
    [[1.0, 0.707, 0.0, 0.0]]
    """
    hit = exact_reward(items, target_item) > 0
    levels = prefix_match_levels(codes, target_codes)
    table = np.array((0.0, *RSVR_PARTIAL))  # index l, capped at 4
    partial = table[np.minimum(levels, len(RSVR_PARTIAL))]
    partial = np.where(np.asarray(items) >= 0, partial, 0.0)
    return np.where(hit, 1.0, partial)


def prefix_reward(items, codes, target_codes, **columns) -> np.ndarray:
    """DeepInterestGR's preference term LCP/3: the share of the first 3 SID levels the completion
    shares with the target, counted from the first level (the exact item, which shares them
    all, gets 1); 0 for no item. With fewer than 3 levels, LCP / levels.

    >>> prefix_reward(np.array([[5, 6, 7, -1]]), np.array([[[1, 2, 3, 0], [1, 2, 0, 0], [0, 2, 3, 0], [-1, -1, -1, -1]]]),
    ...               np.array([[1, 2, 3, 1]])).round(3).tolist()
    [[1.0, 0.667, 0.0, 0.0]]
    """
    codes = np.asarray(codes)
    levels = min(3, codes.shape[2])
    lcp = prefix_match_levels(codes[:, :, :levels], np.asarray(target_codes)[:, :levels])
    return np.where(np.asarray(items) >= 0, lcp / levels, 0.0)


def semantic_reward(items, target_item, item_emb=None, **columns) -> np.ndarray:
    """Cosine similarity between the generated item's embedding and the target's.

    ``item_emb`` (N, D) is the catalogue's embedding matrix (e.g. ``embed/item_emb.npy``),
    passed as a column. r = cos(e_item, e_target) in [-1, 1]; 1 for the exact item; 0 where
    the completion is no item.

    >>> emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> np.round(semantic_reward(np.array([[0, 1, 2, -1]]), np.array([0]), item_emb=emb), 4).tolist()
    [[1.0, 0.0, 0.7071, 0.0]]
    """
    if item_emb is None:
        raise ValueError("the 'semantic' reward needs the column item_emb (N, D): the catalogue's item embeddings")
    emb = np.asarray(item_emb, dtype=np.float64)
    norm = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (N, D)
    items = np.asarray(items)
    gen = norm[np.clip(items, 0, None)]  # (B, G, D)
    tgt = norm[np.asarray(target_item)]  # (B, D)
    cos = np.einsum("bgd,bd->bg", gen, tgt)
    return np.where(items >= 0, cos, 0.0)


def _trm_table(name: str, trm_probs, trm_log_probs, log: bool) -> np.ndarray:
    """The recommender's (B, N) distribution from whichever one column was given, as log-probs or probs."""
    if (trm_probs is None) == (trm_log_probs is None):
        raise ValueError(
            f"the {name!r} reward needs exactly one of the columns trm_probs or trm_log_probs, each (B, N)"
        )
    if log:
        if trm_log_probs is not None:
            return np.asarray(trm_log_probs, dtype=np.float64)
        return np.log(np.maximum(np.asarray(trm_probs, dtype=np.float64), 1e-300))
    return np.asarray(trm_probs, dtype=np.float64) if trm_probs is not None else np.exp(np.asarray(trm_log_probs))


def trm_reward(items, trm_probs=None, trm_log_probs=None, **columns) -> np.ndarray:
    """Model-based reward: a traditional recommender's probability of the generated item.

    The caller runs the model (e.g. the SASRec baseline) on each prompt's history and passes
    its next-item distribution over the catalogue as ``trm_probs`` (B, N) or ``trm_log_probs``
    (B, N). r = p(item | history), 0 where the completion is no item. Probabilities over a
    whole catalogue are small (about 1/N on average): choose the weight accordingly, or use
    this reward alone, where group normalisation removes the scale.

    >>> trm_reward(np.array([[1, 0, -1]]), trm_probs=np.array([[0.2, 0.5, 0.3]])).tolist()
    [[0.5, 0.2, 0.0]]
    """
    probs = _trm_table("trm", trm_probs, trm_log_probs, log=False)
    items = np.asarray(items)
    picked = np.take_along_axis(probs, np.clip(items, 0, None), axis=1)  # (B, G)
    return np.where(items >= 0, picked, 0.0)


def trm_logp_reward(items, trm_probs=None, trm_log_probs=None, **columns) -> np.ndarray:
    """Model-based reward on the log scale: r = log p(item | history) under the traditional
    recommender, and the row's smallest log-probability where the completion is no item.

    Under the KL-regularised RL objective the optimal policy is ``pi_ref * exp(r / beta)``; with
    this reward that is ``pi_ref * p_trm ** (1 / beta)``, a product ensemble of the SFT model and
    the recommender, where ``trm`` (the probability itself) would weigh only the few beams that
    the recommender likes most. Takes the same columns as :func:`trm_reward`.

    >>> trm_logp_reward(np.array([[1, -1]]), trm_probs=np.array([[0.25, 0.5, 0.25]])).round(3).tolist()
    [[-0.693, -1.386]]
    """
    logp = _trm_table("trm_logp", trm_probs, trm_log_probs, log=True)
    items = np.asarray(items)
    picked = np.take_along_axis(logp, np.clip(items, 0, None), axis=1)  # (B, G)
    return np.where(items >= 0, picked, logp.min(axis=1, keepdims=True))


def interest_reward(items, user_interest_emb=None, item_interest_emb=None, **columns) -> np.ndarray:
    """DeepInterestGR's interest bonus: how well the generated item matches the user's positive interests.

    ``user_interest_emb`` (B, D): per prompt, the user's profile of positively labelled
    interests; ``item_interest_emb`` (N, D): per item, the same over its own positive interests
    (both from the ``rldi`` stage, weight-averaged unit embeddings, zero rows where there are
    none). r = max(0, cos(item profile, user profile)) in [0, 1]; 0 where the completion is no
    item or either profile is empty.

    >>> user = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> item = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    >>> np.round(interest_reward(np.array([[0, 1, 2, 3, -1], [0, 1, 2, 3, -1]]), user_interest_emb=user,
    ...                          item_interest_emb=item), 4).tolist()
    [[1.0, 0.7071, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    if user_interest_emb is None or item_interest_emb is None:
        raise ValueError(
            "the 'interest' reward needs the columns user_interest_emb (B, D) and item_interest_emb (N, D): "
            "run the 'rldi' stage"
        )
    emb = np.asarray(item_interest_emb, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (N, D); zero rows stay zero
    user = np.asarray(user_interest_emb, dtype=np.float64)
    user = user / np.maximum(np.linalg.norm(user, axis=1, keepdims=True), 1e-12)  # (B, D)
    items = np.asarray(items)
    cos = np.einsum("bgd,bd->bg", emb[np.clip(items, 0, None)], user)  # (B, G)
    return np.where(items >= 0, np.maximum(cos, 0.0), 0.0)


def quality_reward(items, target_item, item_quality=None, **columns) -> np.ndarray:
    """DeepInterestGR's quality term q_target 1[exact]: an exact hit earns the target's interest quality.

    ``item_quality`` (N,): q = sum(c_k l_k) / sum(c_k) over each item's interests (confidences
    c_k, RLDI labels l_k), from the ``rldi`` stage. The paper's R = 1[exact] + lambda_valid
    1[valid] + lambda_pref LCP/3 + 0.5 q_target 1[exact] is then ``{exact: 1, valid: lambda_valid,
    quality: 0.5}`` plus a prefix term.

    >>> quality_reward(np.array([[5, 7, -1]]), np.array([5]), item_quality=np.arange(8) / 10).tolist()
    [[0.5, 0.0, 0.0]]
    """
    if item_quality is None:
        raise ValueError("the 'quality' reward needs the column item_quality (N,): run the 'rldi' stage")
    q = np.asarray(item_quality, dtype=np.float64)
    return exact_reward(items, target_item) * q[np.asarray(target_item)][:, None]


def valid_reward(valid, **columns) -> np.ndarray:
    """Format/validity: r = 1 for a well-formed SID of a real item, else 0.

    Trie-constrained rollouts are valid by construction (only beam padding is not), so this
    reward matters for unconstrained or reasoning rollouts whose answer is parsed from text.

    >>> valid_reward(np.array([[True, False]])).tolist()
    [[1.0, 0.0]]
    """
    return np.asarray(valid, dtype=bool).astype(np.float64)


def valid_penalty_reward(valid, **columns) -> np.ndarray:
    """Format/validity as a penalty: r = 0 for a well-formed SID of a real item, else -1.

    >>> valid_penalty_reward(np.array([[True, False]])).tolist()
    [[0.0, -1.0]]
    """
    return np.where(np.asarray(valid, dtype=bool), 0.0, -1.0)


REWARDS: dict[str, RewardFn] = {
    "exact": exact_reward,
    "rank": rank_reward,
    "rsvr": rsvr_reward,
    "prefix": prefix_reward,
    "semantic": semantic_reward,
    "trm": trm_reward,
    "trm_logp": trm_logp_reward,
    "interest": interest_reward,
    "quality": quality_reward,
    "valid": valid_reward,
    "valid_penalty": valid_penalty_reward,
}


# The stage whose output each reward's extra column is built from (genrec.train.rl.stage_columns);
# a stage with these rewards lists it among its inputs, so a new embedding or SASRec model makes it stale.
REWARD_INPUTS: dict[str, str] = {
    "semantic": "embed",
    "trm": "sasrec",
    "trm_logp": "sasrec",
    "interest": "rldi",
    "quality": "rldi",
}


# Rewards that never read the target columns: the only ones allowed with unlabelled prompts
# (rl.prompts=histories).
TARGET_FREE_REWARDS = frozenset({"trm", "trm_logp", "valid", "valid_penalty"})


def check_reward_names(weights: Mapping[str, float], registry: Mapping[str, RewardFn]) -> None:
    """Raise ValueError naming the first unknown reward of ``rl.rewards``."""
    if not weights:
        raise ValueError(f"rl.rewards is empty: give at least one of {', '.join(sorted(registry))} with a weight")
    for name in weights:
        if name not in registry:
            raise ValueError(f"rl.rewards.{name}: unknown reward; known rewards: {', '.join(sorted(registry))}")


def combine_rewards(
    weights: Mapping[str, float], columns: Mapping[str, object], registry: Mapping[str, RewardFn] = REWARDS
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The weighted sum of the named rewards (B, G) and each unweighted component (B, G).

    >>> cols = dict(items=np.array([[5, 7]]), target_item=np.array([5]), valid=np.array([[True, True]]))
    >>> total, parts = combine_rewards({"exact": 2.0, "valid": 0.5}, cols)
    >>> total.tolist(), parts["exact"].tolist()
    ([[2.5, 0.5]], [[1.0, 0.0]])
    """
    check_reward_names(weights, registry)
    shape = np.shape(columns["items"])
    total = np.zeros(shape, dtype=np.float64)
    parts = {}
    for name, weight in weights.items():
        r = np.asarray(registry[name](**columns), dtype=np.float64)
        if r.shape != shape:
            raise ValueError(f"reward {name!r} returned shape {r.shape}, expected {shape} (one value per completion)")
        if not np.isfinite(r).all():
            raise ValueError(f"reward {name!r} returned a non-finite value; rewards must be finite numbers")
        parts[name] = r
        total += weight * r
    return total, parts
