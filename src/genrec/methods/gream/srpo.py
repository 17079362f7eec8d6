"""SRPO on reasoning rollouts: a sampled rationale, then the answer SID, as one completion.

``gream.rl_rollout: reasoning`` trains the reasoning mode itself. For each training prompt
(``genrec.train.rl.training_prompts``: training positions only), ``rl.group_size`` rollouts
are played: the ``gream_reason`` prompt ending in ``<think>``, a rationale sampled at
``rl.temperature`` up to ``gream.max_think_tokens`` tokens (``genrec.decode.text``), then,
after the answer marker, one SID sampled inside the item trie (``constrained_sample``).

A rollout is **well formed** when the model wrote the answer marker itself. When it wrote eos
or ran out of budget, the marker is forced so that decoding can go on. Such a rollout has
no answer: its item is -1, so RSVR (and every item reward) gives it 0, and `valid` is
False for the format rewards (`valid_penalty` gives -1). That is GREAM's format condition
on a free-text answer.

The rewards (``rl.rewards``), the advantage (``rl.advantage``: ``bgae`` for SRPO) and
DAPO's dynamic sampling are those of the direct trainer (``genrec.train.rl``); so are the
clipped losses with the k3 KL (``genrec.train.losses.policy_loss``, ``rl.loss``,
``rl.kl_coef``, ``rl.dual_clip``). Here they are applied to completions of different
lengths. Log-probs are teacher-forced over prompt + completion in one forward pass. The loss
covers the tokens the model wrote: the rationale, its own marker or eos, and the SID of a
well-formed rollout. A forced marker, and the SID decoded after it, are masked. With
``loss: dapo`` every token weighs the same, so long rationales weigh more; ``grpo``
averages per completion first. One update per rollout, so the ratio is 1 (as in the
direct trainer with ``updates_per_rollout: 1``).

Valid NDCG@10 in the reasoning mode (greedy rationale, then beam search: what
``gream_eval`` measures) on ``rl.eval_users`` users, at step 0 and every ``rl.eval_every``
steps. The best weights are kept. Every step is checkpointed to ``work_dir``, and a killed run
resumes there.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genrec.data.dataset import Dataset

log = logging.getLogger("genrec")


@dataclass
class ReasoningRollout:
    """``G`` rollouts of each of ``B`` prompts, row ``b * G + j`` being rollout ``j`` of prompt ``b``."""

    ids: list[list[int]]  # prompt + completion token ids
    generated: list[list[bool]]  # True where the token takes loss (written by the model, not masked)
    well_formed: np.ndarray  # (B, G) bool: the model wrote the answer marker
    items: np.ndarray  # (B, G) item_id of the answer, -1 for a malformed rollout
    codes: np.ndarray  # (B, G, L) its SID codes, -1 for a malformed rollout
    think_tokens: np.ndarray  # (B, G) rationale length


@torch.no_grad()
def reasoning_rollout(
    recommender, histories, group_size: int, max_think_tokens: int, temperature: float, generator=None
) -> ReasoningRollout:
    """Play ``group_size`` reasoning rollouts per history (the module docstring)."""
    from genrec.decode.beam import constrained_sample
    from genrec.decode.text import generate_until, left_pad
    from genrec.methods.gream.reasoning import reasoning_prompts

    model, fmt = recommender.model, recommender.fmt
    prompts = [p for p in reasoning_prompts(recommender, histories) for _ in range(group_size)]
    out = generate_until(model, prompts, [fmt.answer], fmt.eos_id, fmt.pad_id, max_think_tokens, temperature, generator)
    answer = list(fmt.answer)
    contexts, written = [], []
    for prompt, ids, stop in zip(prompts, out.ids, out.stop):
        own_end = answer if stop == 0 else [fmt.eos_id] if stop == -1 else []
        # The marker follows the rationale either way; only one the model wrote takes loss.
        tail = own_end + ([] if stop == 0 else answer)
        contexts.append(prompt + ids + tail)
        written.append(
            [False] * len(prompt) + [True] * (len(ids) + len(own_end)) + [False] * (len(tail) - len(own_end))
        )
    input_ids, attention_mask = left_pad(contexts, fmt.pad_id, recommender.device)
    sid = constrained_sample(
        model, input_ids, attention_mask, recommender.trie, recommender.vocab.offsets, 1, temperature, generator
    )
    well_formed = np.asarray([s == 0 for s in out.stop], dtype=bool)
    tokens = sid.token_ids[:, 0].cpu().numpy()  # (B*G, L)
    ids = [c + t.tolist() for c, t in zip(contexts, tokens)]
    generated = [w + [bool(ok)] * tokens.shape[1] for w, ok in zip(written, well_formed)]
    items = np.where(well_formed, sid.items[:, 0].cpu().numpy(), -1)
    codes = np.where(well_formed[:, None], sid.codes[:, 0].cpu().numpy(), -1)
    shape = (len(histories), group_size)
    return ReasoningRollout(
        ids,
        generated,
        well_formed.reshape(shape),
        items.reshape(shape),
        codes.reshape(*shape, -1),
        np.asarray([len(r) for r in out.ids]).reshape(shape),
    )


def train_reasoning_srpo(cfg, dataset: Dataset, recommender, out_dir: Path, work_dir: Path, extra_columns=None) -> dict:
    """SRPO of ``recommender`` in place on reasoning rollouts; keeps the best valid weights."""
    recommender.check_free_text("GREAM's SRPO")
    from tqdm import tqdm

    from genrec.eval.evaluate import rank_examples
    from genrec.eval.generative import num_beams_for
    from genrec.eval.metrics import ndcg_at_k, target_ranks
    from genrec.methods.gream.reasoning import reasoning_ranker
    from genrec.train.advantages import compute_advantages, informative_groups
    from genrec.train.losses import policy_loss
    from genrec.train.rewards import REWARDS, check_reward_names, combine_rewards
    from genrec.train.rl import sample_examples, sequence_log_probs, training_prompts
    from genrec.train.rl_run import RLRun

    rl, g = cfg.rl, cfg.gream
    check_reward_names(rl.rewards, REWARDS)
    if rl.loss == "listwise":
        raise ValueError(
            "rl.loss=listwise needs beam groups scored by their reference log-probs: SRPO's rollouts are reasoning samples, use grpo, dapo or gspo"
        )
    if rl.prompts != "targets":
        raise ValueError(
            f"rl.prompts={rl.prompts}: SRPO's rewards score each rollout against its target, use rl.prompts=targets"
        )
    if "rank" in rl.rewards:
        raise ValueError("rl.rewards.rank depends on beam order: reasoning rollouts are sampled, use rsvr or exact")
    model, fmt = recommender.model, recommender.fmt
    prompts = training_prompts(dataset, rl.targets_per_user, cfg.data.max_history)
    codes_of = recommender.trie.codes.cpu().numpy()  # (N, L) SID codes of every item
    valid = sample_examples(dataset.examples("valid"), rl.eval_users, cfg.seed)
    reference = None
    if rl.kl_coef > 0:
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rl.lr, weight_decay=rl.weight_decay)
    num_beams = num_beams_for(cfg, cfg.data.max_history)

    def valid_ndcg() -> float:
        from dataclasses import replace

        eval_cfg = replace(cfg.eval, batch_size=min(cfg.eval.batch_size, cfg.decode.batch_size), ks=[10])
        ranker = reasoning_ranker(recommender, num_beams, g.max_think_tokens, g.think_temperature, cfg.seed)
        ranked = rank_examples(ranker, valid, eval_cfg, dataset.num_items, desc="srpo valid (reasoning)")
        return ndcg_at_k(target_ranks(ranked, valid.targets), 10)

    model.eval()  # no dropout: the sampled policy is the one trained (as the direct trainer)
    run = RLRun("srpo (reasoning)", model, opt, work_dir, valid_ndcg)
    bar = tqdm(total=rl.steps, initial=run.step, desc="srpo (reasoning)", unit="step")
    while run.step < rl.steps:
        step = run.step + 1
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(prompts), size=min(rl.batch_size, len(prompts)), replace=False)
        histories = [prompts.histories[i] for i in idx]
        targets = prompts.targets[idx]
        generator = torch.Generator(device=recommender.device).manual_seed(int(rng.integers(2**31)))
        ro = reasoning_rollout(recommender, histories, rl.group_size, g.max_think_tokens, rl.temperature, generator)
        columns = {
            "items": ro.items,
            "codes": ro.codes,
            "target_item": targets,
            "target_codes": codes_of[targets],
            "valid": ro.well_formed,
        }
        for name, value in (extra_columns or {}).items():
            columns[name] = (
                value(histories=histories, target_item=targets, user_ids=prompts.user_ids[idx])
                if callable(value)
                else value
            )
        rewards, parts = combine_rewards(rl.rewards, columns, REWARDS)  # (B, G)
        hits = ro.items == targets[:, None]
        advantages = compute_advantages(rl.advantage, rewards, hits, k=rl.bgae_k, scale=rl.scale_rewards)  # (B, G)
        keep = informative_groups(rewards) if rl.dynamic_sampling else np.ones(len(idx), dtype=bool)
        row = {
            "step": step,
            "reward": float(rewards.mean()),
            **{f"reward/{name}": float(r.mean()) for name, r in parts.items()},
            "hit_rate": float(hits.any(axis=1).mean()),
            "well_formed": float(ro.well_formed.mean()),
            "think_tokens": float(ro.think_tokens.mean()),
            "groups_kept": float(keep.mean()),
        }
        rows_kept = [b * rl.group_size + j for b in np.flatnonzero(keep) for j in range(rl.group_size)]
        if rows_kept:
            ids = [ro.ids[r] for r in rows_kept]
            gen = [ro.generated[r] for r in rows_kept]
            logp, mask = sequence_log_probs(model, ids, gen, fmt.pad_id)
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref, _ = sequence_log_probs(reference, ids, gen, fmt.pad_id)
            adv = torch.as_tensor(advantages[keep].reshape(-1), dtype=torch.float32, device=logp.device)
            loss, stats = policy_loss(
                logp,
                logp.detach(),
                adv,
                mask,
                kind=rl.loss,
                clip_eps=rl.clip_eps,
                clip_eps_high=rl.clip_eps_high or None,
                dual_clip=rl.dual_clip,
                ref_logp=ref,
                kl_coef=rl.kl_coef,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), rl.grad_clip if rl.grad_clip > 0 else float("inf")
            )
            opt.step()
            row.update(
                loss=float(loss.detach()),
                kl=stats["kl"],
                clip_frac=stats["clip_frac"],
                grad_norm=float(grad_norm),
                loss_tokens=int(mask.sum()),
            )
        else:  # no informative group: nothing to learn from this batch
            row.update(loss=0.0, kl=0.0, clip_frac=0.0, grad_norm=0.0, loss_tokens=0)
        over_budget = run.over_budget(rl.max_minutes)
        last = step == rl.steps or over_budget
        run.end_step(row, evaluate=step % rl.eval_every == 0 or last, save=True)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", formed=f"{row['well_formed']:.2f}", best=f"{run.best:.4f}")
        if over_budget:
            log.info("srpo (reasoning): stopping at the %.1f-minute budget after step %d", rl.max_minutes, step)
            break
    bar.close()
    return run.finish(recommender, out_dir, rollout="reasoning")
