"""Clipped policy-gradient losses of the GRPO family, with a k3 KL penalty to a reference.

Inputs are per completion token: ``logp`` (N, L) the current policy's log-probs of the
generated tokens (with grad), ``old_logp`` (N, L) those of the policy that generated them
(no grad), ``ref_logp`` (N, L) those of the frozen reference model, ``mask`` (N, L) 1 for
real completion tokens, and ``advantages`` (N,) one per completion.

Token level (GRPO, DAPO), with ratio r_t = exp(logp_t - old_logp_t):
    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)   (+ dual clip: l_t <= c |A| when A < 0)
          + kl_coef * k3_t,    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (>= 0, unbiased for KL)
- ``grpo``: the mean over each sequence's tokens, then the mean over sequences;
- ``dapo``: the mean over all tokens of the batch (long completions weigh more).
Sequence level (GSPO): s = exp(mean_t (logp_t - old_logp_t)), one ratio per sequence,
    l = -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A) + kl_coef * mean_t k3_t, mean over sequences.
GSPO's ratio is a geometric mean over tokens, so its useful clip range is far narrower than
the token-level one (the paper uses 3e-4 / 4e-4).

SID completions all have L tokens, so ``grpo`` and ``dapo`` weigh tokens identically here;
they differ for completions of different lengths (reasoning text, masked rows).

Listwise (``listwise_loss``, ``rl.loss=listwise``): the KL-regularised objective
E[r] - beta KL(pi || pi_ref) has the closed-form optimum pi* ∝ pi_ref exp(r / beta). Restricted
to a group of G completions, with the reward weights as 1 / beta,
    q_i = softmax_i(ref_i + r_i),    l = -sum_i q_i log softmax_i(s_i),
where s_i and ref_i are completion i's sequence log-probs under the policy and the reference:
the policy's distribution over its own group is pulled onto the optimum's, in one
cross-entropy, rather than by sampled advantages. With r = lam * log p_SASRec the target is
the product ensemble pi_ref * p_SASRec^lam that reranking the beams computes
(bench/bench_rerank_headroom.py). Its gradient in s_i is softmax_i(s) - q_i: zero once the
group is ordered and spaced as the optimum is.

To accumulate gradients over chunks of a batch, pass the whole batch's ``num_sequences`` and
``num_tokens``: each chunk's loss is then its share of the batch loss, and the chunk losses
sum to it.
"""

from __future__ import annotations

import torch

POLICY_LOSSES = ("grpo", "dapo", "gspo")  # policy_loss; rl.loss "listwise" is listwise_loss


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1, d = ref - logp.

    >>> round(float(k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0]))[0]), 4)
    0.3679
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _clipped_surrogate(ratio, adv, eps_low: float, eps_high: float, dual_clip: float):
    """-min(ratio A, clip(ratio) A), optionally bounded by dual_clip |A| where A < 0; and which entries clip."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    is_clipped = (clipped > unclipped).detach()
    return loss, is_clipped


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "dapo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (a scalar with grad) and its statistics: ``kl`` (token mean of k3),
    ``clip_frac`` (share of tokens, or sequences for GSPO, whose clipped term is active),
    ``ratio`` (mean ratio).

    ``clip_eps_high`` defaults to ``clip_eps`` (DAPO's clip-higher uses a larger one);
    ``dual_clip`` > 1 bounds the loss of negative-advantage tokens (0 disables).
    """
    if kind not in POLICY_LOSSES:
        hint = " (listwise scores whole groups: genrec.train.losses.listwise_loss)" if kind == "listwise" else ""
        raise ValueError(f"rl.loss must be one of {POLICY_LOSSES} here, got {kind!r}{hint}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"shapes disagree: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} "
            f"must be (N, L) and advantages {tuple(advantages.shape)} must be (N,)"
        )
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp, the reference model's log-probs")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1)  # (N,)
    num_sequences = num_sequences or int((lengths > 0).sum())
    num_tokens = num_tokens or int(mask.sum())
    adv = advantages.to(logp.dtype)

    kl = k3_kl(logp, ref_logp) * mask if ref_logp is not None else torch.zeros_like(logp)  # (N, L)
    log_ratio = (logp - old_logp) * mask  # (N, L)
    if kind == "gspo":
        seq_log_ratio = log_ratio.sum(dim=1) / lengths.clamp(min=1)  # (N,)
        ratio = torch.exp(seq_log_ratio)
        surrogate, is_clipped = _clipped_surrogate(ratio, adv, clip_eps, eps_high, dual_clip)  # (N,)
        per_seq = surrogate + kl_coef * kl.sum(dim=1) / lengths.clamp(min=1)
        loss = (per_seq * (lengths > 0)).sum() / max(num_sequences, 1)
        clip_frac = (is_clipped & (lengths > 0)).sum().item() / max(int((lengths > 0).sum()), 1)
        mean_ratio = ratio[lengths > 0].mean().item() if bool((lengths > 0).any()) else 1.0
    else:
        ratio = torch.exp(log_ratio)  # (N, L)
        surrogate, is_clipped = _clipped_surrogate(ratio, adv[:, None], clip_eps, eps_high, dual_clip)  # (N, L)
        per_token = (surrogate + kl_coef * kl) * mask
        if kind == "grpo":
            loss = (per_token.sum(dim=1) / lengths.clamp(min=1)).sum() / max(num_sequences, 1)
        else:
            loss = per_token.sum() / max(num_tokens, 1)
        clip_frac = (is_clipped * mask).sum().item() / max(mask.sum().item(), 1.0)
        mean_ratio = ((ratio * mask).sum() / mask.sum().clamp(min=1)).item()
    stats = {
        "kl": (kl.sum() / mask.sum().clamp(min=1)).item(),
        "clip_frac": clip_frac,
        "ratio": mean_ratio,
    }
    return loss, stats


def listwise_loss(
    seq_logp: torch.Tensor,
    ref_seq_logp: torch.Tensor,
    rewards: torch.Tensor,
    live: torch.Tensor,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy from the group's KL-regularised optimum softmax(ref + r) to softmax(seq_logp).

    seq_logp (K, G) the policy's sequence log-probs (with grad), ref_seq_logp (K, G) the
    reference's, rewards (K, G), live (K, G) False for padding completions (left out of both
    softmaxes). Returns the loss (the mean over ``num_groups`` groups, default K, so chunk losses
    sum to the batch's) and ``agreement``: the share of groups whose policy top-1 is the target's.

    A policy already at the optimum has zero gradient:

    >>> ref = torch.tensor([[-1.0, -2.0, -3.0]]); r = torch.tensor([[0.0, 1.5, 0.0]])
    >>> s = (ref + r).clone().requires_grad_(True)
    >>> loss, st = listwise_loss(s, ref, r, torch.ones(1, 3, dtype=torch.bool)); loss.backward()
    >>> float(s.grad.abs().max()) < 1e-7, st["agreement"]
    (True, 1.0)
    """
    if not (seq_logp.shape == ref_seq_logp.shape == rewards.shape == live.shape) or seq_logp.dim() != 2:
        raise ValueError(
            f"shapes disagree: seq_logp {tuple(seq_logp.shape)}, ref_seq_logp {tuple(ref_seq_logp.shape)}, "
            f"rewards {tuple(rewards.shape)}, live {tuple(live.shape)} must all be (K, G)"
        )
    neg = torch.finfo(seq_logp.dtype).min
    target_logits = torch.where(live, ref_seq_logp.to(seq_logp.dtype) + rewards.to(seq_logp.dtype), neg)
    q = torch.softmax(target_logits, dim=1).detach()  # (K, G)
    log_p = torch.log_softmax(torch.where(live, seq_logp, neg), dim=1)  # (K, G)
    per_group = -(q * torch.where(live, log_p, 0.0)).sum(dim=1)  # (K,)
    loss = per_group.sum() / max(num_groups or len(per_group), 1)
    agreement = (log_p.argmax(dim=1) == q.argmax(dim=1)).float().mean().item() if len(per_group) else 1.0
    return loss, {"agreement": agreement}
