"""The ``rl`` stage: GRPO-family post-training of the SFT recommender on trie-constrained rollouts.

One step, for a batch of B training prompts (history -> next item, training split only):

1. rollout: G completions per prompt, by ``constrained_beam_search`` (the group is the beams,
   best first, so rank-aware rewards see the ranking) or ``constrained_sample``;
2. rewards: the weighted sum of ``rl.rewards`` over batch columns (items, codes, target...);
3. advantages per group (GRPO or BGAE); with ``dynamic_sampling`` the groups whose rewards
   are all equal are dropped;
4. log-probs of the L generated SID tokens (teacher-forced; each prompt encoded once for its
   group) under the policy, the rollout policy (old) and the frozen SFT model (reference, for
   the k3 KL);
5. the clipped loss (``rl.loss``: grpo / dapo / gspo), AdamW, gradient clipping.

The loop is our own rather than TRL's ``GRPOTrainer`` (docs/rl.md says why). The model stays
in eval mode throughout (dropout off, as TRL's ``disable_dropout``), so the rollout, old and
current log-probs of a batch agree before its first update. Valid NDCG@10 on a fixed sample of
users is measured at step 0 (the SFT model) and every ``eval_every`` steps; the best model is
the one written. Checkpoints (model, optimiser, step, RNG, best model) live in ``work_dir`` and a
killed run resumes from the last one. Outputs: ``model/`` (``GenerativeRecommender.save``),
``rl_curves.jsonl``, ``rl_curves.png``, and from the stage, ``eval/`` (the test harness).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genrec.config import RunConfig
from genrec.data.dataset import Dataset, Examples
from genrec.model.backbone import cache_kwargs, output_cache
from genrec.train.advantages import compute_advantages, informative_groups
from genrec.train.rewards import (
    REWARD_INPUTS,
    REWARDS,
    TARGET_FREE_REWARDS,
    RewardFn,
    check_reward_names,
    combine_rewards,
)
from genrec.train.rl_run import RLRun

log = logging.getLogger("genrec")

# A column is a value passed to every reward call as is (e.g. item_emb (N, D)), or a callable
# fn(histories=list of arrays, target_item=(B,), user_ids=(B,)) -> array, called per batch
# for columns that depend on the prompt (e.g. trm_log_probs (B, N)).
Column = Any


@dataclass
class Prompts:
    """Training prompts: one (user, history, next item) per training position used."""

    user_ids: np.ndarray  # (P,) int64
    histories: list[np.ndarray]  # each the last max_history items before the target
    targets: np.ndarray  # (P,) int64; -1 for an unlabelled prompt (history_prompts)

    def __len__(self) -> int:
        return len(self.targets)


def training_prompts(dataset: Dataset, targets_per_user: int, max_history: int) -> Prompts:
    """For each user, the last ``targets_per_user`` positions of the training part as targets.

    Only training items appear, as targets or in histories: valid and test targets never do.
    A position needs at least one item before it.
    """
    users, histories, targets = [], [], []
    for u, seq in enumerate(dataset.train_sequences()):
        for p in range(max(1, len(seq) - targets_per_user), len(seq)):
            users.append(u)
            histories.append(seq[max(0, p - max_history) : p])
            targets.append(seq[p])
    if not targets:
        raise ValueError("no training prompts: every user's training part has fewer than 2 items")
    return Prompts(np.asarray(users, dtype=np.int64), histories, np.asarray(targets, dtype=np.int64))


def history_prompts(dataset: Dataset, max_history: int) -> Prompts:
    """For each user, the whole training part as one unlabelled prompt (target -1).

    What follows it is the valid item, which no reward sees: only rewards that need no target
    (``TARGET_FREE_REWARDS``) can score these. Users with an empty training part are left out.
    """
    users, histories = [], []
    for u, seq in enumerate(dataset.train_sequences()):
        if len(seq):
            users.append(u)
            histories.append(seq[-max_history:])
    if not users:
        raise ValueError("no history prompts: every user's training part is empty")
    return Prompts(np.asarray(users, dtype=np.int64), histories, np.full(len(users), -1, dtype=np.int64))


def rl_prompts(dataset: Dataset, rl, max_history: int) -> Prompts:
    """The prompts ``rl.prompts`` names; unlabelled ones only with rewards that need no target."""
    if rl.prompts == "targets":
        return training_prompts(dataset, rl.targets_per_user, max_history)
    for name in rl.rewards:
        if name not in TARGET_FREE_REWARDS:
            raise ValueError(
                f"rl.rewards.{name} needs each prompt's target item, and rl.prompts=histories has none: "
                f"use rewards among {', '.join(sorted(TARGET_FREE_REWARDS))}, or rl.prompts=targets"
            )
    if rl.advantage == "bgae":
        raise ValueError("rl.advantage=bgae counts hits of the target item, and rl.prompts=histories has none")
    return history_prompts(dataset, max_history)


def completion_log_probs(model, input_ids, attention_mask, token_ids, offsets=None, trie=None):
    """Log-probs (B, G, L) of G completions (B, G, L) of each LEFT-padded prompt (B, T).

    Teacher-forced, under the full-vocabulary softmax (or, given the ``trie`` and the SID
    ``offsets`` (L,), the trie softmax of ``genrec.model.sid_softmax``), with the position ids the decoder uses,
    so the sum over L equals the beam score of the same completion. Each prompt is encoded
    once and its KV cache repeated for its G completions (gradients flow through both): the
    prompt is some 60 tokens and a completion L = 3, so this is ~G times cheaper than
    running prompt + completion for every completion.
    """
    import torch

    from genrec.model.sid_softmax import sid_log_probs

    b, g, num_tokens = token_ids.shape
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens counted, as in decoding
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    logits = out.logits[:, -1:].float().repeat_interleave(g, dim=0)  # (B*G, 1, V): predicts token 0
    flat = token_ids.reshape(b * g, num_tokens)  # row b * G + j is completion j of prompt b
    if num_tokens > 1:
        cache = output_cache(out)
        cache.batch_repeat_interleave(g)
        mask = attention_mask.repeat_interleave(g, dim=0)  # (B*G, T)
        mask = torch.cat([mask, mask.new_ones(b * g, num_tokens - 1)], dim=1)  # (B*G, T + L - 1)
        steps = torch.arange(1, num_tokens, device=positions.device)  # (L - 1,)
        rest_positions = (positions[:, -1:] + steps).repeat_interleave(g, dim=0)  # (B*G, L - 1)
        rest = model(
            input_ids=flat[:, :-1], attention_mask=mask, position_ids=rest_positions, **cache_kwargs(model, cache)
        ).logits.float()  # (B*G, L - 1, V): predict tokens 1 .. L-1
        logits = torch.cat([logits, rest], dim=1)  # (B*G, L, V)
    return sid_log_probs(logits, flat, offsets, trie).view(b, g, num_tokens)


def sequence_log_probs(model, ids: list[list[int]], generated: list[list[bool]], pad_id: int):
    """Teacher-forced log-probs (N, T-1) of every next token of variable-length rows (right-padded
    here), and (N, T-1) float 1 where ``generated`` marks the predicted token as one that takes loss.
    Always under the full-vocabulary softmax: these rows are free text, sampled from it
    (``GenerativeRecommender.check_free_text``).

    For completions of different lengths (GREAM's reasoning rollouts, DeepRec's trajectories);
    fixed-length SID completions use the cheaper :func:`completion_log_probs`.
    """
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for b, (row, gen) in enumerate(zip(ids, generated)):
        input_ids[b, : len(row)] = torch.as_tensor(row)
        mask[b, : len(row)] = torch.as_tensor(gen)
        attention[b, : len(row)] = 1
    input_ids, mask, attention = input_ids.to(device), mask.to(device), attention.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()  # (N, T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return logp, mask[:, 1:].float()


def _model_device(model):
    return next(model.parameters()).device


def rollout(recommender, histories: list[np.ndarray], rl, generator=None):
    """(input_ids (B, T), attention_mask (B, T), BeamOutput with K = rl.group_size) for a batch."""
    from genrec.decode.beam import constrained_beam_search, constrained_sample

    model = recommender.model
    device = _model_device(model)
    input_ids, attention_mask = recommender.prompt_batch([list(map(int, h)) for h in histories])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    offsets = recommender.vocab.offsets
    softmax = recommender.sid_softmax
    if rl.rollout == "beam":
        out = constrained_beam_search(
            model, input_ids, attention_mask, recommender.trie, offsets, rl.group_size, sid_softmax=softmax
        )
    else:
        out = constrained_sample(
            model,
            input_ids,
            attention_mask,
            recommender.trie,
            offsets,
            rl.group_size,
            rl.temperature,
            generator,
            sid_softmax=softmax,
        )
    return input_ids, attention_mask, out


def batch_columns(
    out,
    targets: np.ndarray,
    histories: list[np.ndarray],
    user_ids: np.ndarray,
    trie_codes: np.ndarray,
    extra_columns: Mapping[str, Column],
) -> dict[str, Any]:
    """The columns every reward receives: rollout arrays, targets, and the caller's extra columns."""
    items = out.items.cpu().numpy()
    columns = {
        "items": items,  # (B, G)
        "codes": out.codes.cpu().numpy(),  # (B, G, L)
        "target_item": targets,  # (B,)
        "target_codes": np.where(targets[:, None] >= 0, trie_codes[targets], -1),  # (B, L); -1 rows: no target
        "valid": items >= 0,  # (B, G)
    }
    for name, value in extra_columns.items():
        if name in columns:
            raise ValueError(f"extra column {name!r} would replace a built-in column; rename it")
        columns[name] = value(histories=histories, target_item=targets, user_ids=user_ids) if callable(value) else value
    return columns


def evaluate_valid(recommender, examples: Examples, cfg: RunConfig) -> float:
    """Valid NDCG@10 of the recommender on ``examples``, through the evaluation harness."""
    from dataclasses import replace

    from genrec.eval.evaluate import rank_examples
    from genrec.eval.generative import beam_ranker, num_beams_for
    from genrec.eval.metrics import ndcg_at_k, target_ranks

    eval_cfg = replace(cfg.eval, batch_size=min(cfg.eval.batch_size, cfg.decode.batch_size), ks=[10])
    ranker = beam_ranker(recommender, num_beams_for(cfg, cfg.data.max_history))
    ranked = rank_examples(ranker, examples, eval_cfg, num_items=recommender.trie.num_items, desc="rl valid")
    return ndcg_at_k(target_ranks(ranked, examples.targets), 10)


def sample_examples(examples: Examples, num: int, seed: int) -> Examples:
    """A fixed random subset of ``num`` examples (all when num is 0 or larger)."""
    if num <= 0 or num >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=num, replace=False))
    return Examples(
        examples.split,
        examples.user_ids[idx],
        [examples.histories[i] for i in idx],
        examples.targets[idx],
        [examples.seen[i] for i in idx],
    )


def policy_update(
    model, reference, opt, rl, input_ids, attention_mask, token_ids, advantages, offsets, rewards=None, trie=None
) -> dict:
    """``rl.updates_per_rollout`` optimiser steps on K groups; the logged statistics of the last.

    input_ids, attention_mask (K, T): the prompts; token_ids (K, G, L): their completions
    (-1 for beam padding, left out of the loss); advantages (K, G); offsets (L,) the SID offsets;
    rewards (K, G), which ``rl.loss=listwise`` uses instead of the advantages; ``trie`` for a
    model trained under the trie SID softmax (``GenerativeRecommender.sid_softmax``).
    """
    import torch

    from genrec.train.losses import k3_kl, listwise_loss, policy_loss

    if rl.loss == "listwise" and (reference is None or rewards is None):
        raise ValueError("rl.loss=listwise needs the reference model and the rewards")

    k, g, num_levels = token_ids.shape
    live = (token_ids >= 0).all(dim=2)  # (K, G)
    # Padding reads a real SID (any, under the vocab softmax; item 0's under the trie's): the row is masked.
    fill = offsets if trie is None else trie.codes[0].to(offsets.device) + offsets
    tokens = torch.where(token_ids >= 0, token_ids, fill)
    mask = live.unsqueeze(-1).expand_as(tokens).float()  # (K, G, L)
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=input_ids.device)  # (K, G)
    if rewards is not None:
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=input_ids.device)  # (K, G)
    micro = rl.micro_batch_size or rl.batch_size
    chunks = [slice(s, s + micro) for s in range(0, k, micro)]  # groups per forward/backward
    num_seq, num_tok = int(live.sum()), int(mask.sum())

    def log_probs(lm, c):  # (k_c * G, L)
        return completion_log_probs(lm, input_ids[c], attention_mask[c], tokens[c], offsets, trie).reshape(
            -1, num_levels
        )

    with torch.no_grad():
        ref = [log_probs(reference, c) for c in chunks] if reference is not None else [None] * len(chunks)
        # With one update per rollout the old log-probs are the current ones, detached (TRL does the same).
        old = [log_probs(model, c) for c in chunks] if rl.updates_per_rollout > 1 else None
    params = [p for group in opt.param_groups for p in group["params"]]
    for _ in range(rl.updates_per_rollout):
        opt.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
        for i, c in enumerate(chunks):
            logp = log_probs(model, c)
            chunk_mask = mask[c].reshape(-1, num_levels)  # (k_c * G, L)
            if rl.loss == "listwise":
                per_seq = (logp * chunk_mask).sum(dim=1).reshape(-1, g)  # (k_c, G) sequence log-probs
                ref_seq = (ref[i] * chunk_mask).sum(dim=1).reshape(-1, g)
                loss, st = listwise_loss(per_seq, ref_seq, rewards[c], live[c], num_groups=k)
                kl = (k3_kl(logp, ref[i]) * chunk_mask).sum()
                loss = loss + rl.kl_coef * kl / max(num_tok, 1)
                st.update(kl=kl.item() / max(float(chunk_mask.sum()), 1.0), clip_frac=0.0, ratio=1.0)
                stats.setdefault("agreement", 0.0)
                stats["agreement"] += st["agreement"] * len(per_seq) / k
            else:
                loss, st = policy_loss(
                    logp,
                    old[i] if old is not None else logp.detach(),
                    adv[c].reshape(-1),
                    chunk_mask,
                    kind=rl.loss,
                    clip_eps=rl.clip_eps,
                    clip_eps_high=rl.clip_eps_high or None,
                    dual_clip=rl.dual_clip,
                    ref_logp=ref[i],
                    kl_coef=rl.kl_coef,
                    num_sequences=num_seq,
                    num_tokens=num_tok,
                )
            loss.backward()  # each chunk's loss is its share of the batch loss
            stats["loss"] += loss.item()
            share = float(chunk_mask.sum()) / max(num_tok, 1)
            for key in ("kl", "clip_frac", "ratio"):
                stats[key] += st[key] * share
        grad_norm = torch.nn.utils.clip_grad_norm_(params, rl.grad_clip if rl.grad_clip > 0 else float("inf"))
        opt.step()
    return {**stats, "grad_norm": float(grad_norm)}


def train_rl(
    cfg: RunConfig,
    dataset: Dataset,
    recommender,
    out_dir: str | Path,
    work_dir: str | Path,
    extra_columns: Mapping[str, Column] | None = None,
    extra_rewards: Mapping[str, RewardFn] | None = None,
) -> dict:
    """RL post-training of ``recommender`` in place; writes ``out_dir/model`` and the curves.

    ``extra_columns`` reach every reward as keyword arguments (see ``Column``); ``extra_rewards``
    add name -> reward functions that ``cfg.rl.rewards`` may then name beside the built-in ones.
    Returns a summary: valid NDCG@10 of the SFT model (step 0) and of the best step, steps run.
    """
    import copy

    import torch
    from tqdm import tqdm

    rl = cfg.rl
    registry = {**REWARDS, **(extra_rewards or {})}
    check_reward_names(rl.rewards, registry)
    if rl.rollout != "beam" and "rank" in rl.rewards:
        raise ValueError("rl.rewards.rank depends on beam order: use it with rl.rollout=beam")
    extra_columns = dict(extra_columns or {})

    torch.manual_seed(cfg.seed)
    model = recommender.model
    model.eval()  # dropout off for rollouts and updates alike
    device = _model_device(model)
    reference = None
    if rl.kl_coef > 0 or rl.loss == "listwise":  # listwise's target is pi_ref * exp(reward)
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)

    prompts = rl_prompts(dataset, rl, cfg.data.max_history)
    valid = sample_examples(dataset.examples("valid"), rl.eval_users, cfg.seed)
    trie_codes = recommender.trie.codes.cpu().numpy()
    offsets = torch.as_tensor(list(recommender.vocab.offsets), device=device)  # (L,)
    log.info("rl: %d training prompts, %d valid users for model selection", len(prompts), len(valid))

    run = RLRun("rl", model, opt, work_dir, lambda: evaluate_valid(recommender, valid, cfg))

    per_epoch = max(1, len(prompts) // rl.batch_size)
    bar = tqdm(total=rl.steps, initial=run.step, desc="rl", unit="step")
    while run.step < rl.steps:
        step = run.step + 1
        epoch, pos = divmod(step - 1, per_epoch)
        # The prompt order depends on (seed, epoch) only, so a resumed run sees the same batches.
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[pos * rl.batch_size : (pos + 1) * rl.batch_size].numpy()
        histories = [prompts.histories[i] for i in idx]
        targets, user_ids = prompts.targets[idx], prompts.user_ids[idx]

        generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + step)
        input_ids, attention_mask, out = rollout(recommender, histories, rl, generator)
        columns = batch_columns(out, targets, histories, user_ids, trie_codes, extra_columns)
        rewards, parts = combine_rewards(rl.rewards, columns, registry)  # (B, G)
        hits = (columns["items"] == targets[:, None]) & (targets[:, None] >= 0)  # (B, G)
        advantages = compute_advantages(rl.advantage, rewards, hits, k=rl.bgae_k, scale=rl.scale_rewards)  # (B, G)
        keep = informative_groups(rewards) if rl.dynamic_sampling else np.ones(len(idx), dtype=bool)

        row = {
            "step": step,
            "reward": float(rewards.mean()),
            **{f"reward/{name}": float(r.mean()) for name, r in parts.items()},
            **({"hit_rate": float(hits.any(axis=1).mean())} if rl.prompts == "targets" else {}),
            "groups_kept": float(keep.mean()),
        }
        kept = np.flatnonzero(keep)
        if len(kept):
            row.update(
                policy_update(
                    model,
                    reference,
                    opt,
                    rl,
                    input_ids[kept],
                    attention_mask[kept],
                    out.token_ids[kept],
                    advantages[kept],
                    offsets,
                    rewards=rewards[kept],
                    trie=recommender.trie if recommender.sid_softmax == "trie" else None,
                )
            )
        else:  # no informative group: nothing to learn from this batch
            row.update(loss=0.0, kl=0.0, clip_frac=0.0, ratio=1.0, grad_norm=0.0)

        over_budget = run.over_budget(rl.max_minutes)
        last = step == rl.steps or over_budget
        run.end_step(row, evaluate=step % rl.eval_every == 0 or last, save=step % rl.save_every == 0 or last)
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['reward']:.3f}", hit=f"{row.get('hit_rate', float('nan')):.2f}", best=f"{run.best:.4f}"
        )
        if over_budget:
            log.info("rl: stopping at the %.1f-minute budget after step %d", rl.max_minutes, step)
            break
    bar.close()
    return run.finish(recommender, out_dir)


def stage_columns(ctx) -> dict[str, Column]:
    """Columns the configured rewards need, built from the stages in ``REWARD_INPUTS``.

    The pipeline counts those stages among the stage's inputs (``genrec.pipeline.reward_inputs``),
    so they have run and their files enter its input hash.
    """
    columns: dict[str, Column] = {}
    if "semantic" in ctx.cfg.rl.rewards:
        columns["item_emb"] = np.load(ctx.input(REWARD_INPUTS["semantic"]) / "item_emb.npy")
    if any(REWARD_INPUTS.get(name) == "sasrec" for name in ctx.cfg.rl.rewards):  # trm, trm_logp
        import torch

        from genrec.baselines.sasrec import SASRec

        sasrec = SASRec.load(ctx.input("sasrec") / "model.pt")

        def trm_log_probs(histories, **_):
            return torch.log_softmax(sasrec.score(histories), dim=-1).numpy()

        columns["trm_log_probs"] = trm_log_probs
    if "interest" in ctx.cfg.rl.rewards:
        labelled = ctx.input(REWARD_INPUTS["interest"])
        # Users' profiles come from interests mined before their last rldi.holdout training items.
        users = np.load(labelled / "user_interest_emb.npy")  # (U, D)
        columns["item_interest_emb"] = np.load(labelled / "item_interest_emb.npy")  # (N, D)
        columns["user_interest_emb"] = lambda user_ids, **_: users[user_ids]  # (B, D), per prompt
    if "quality" in ctx.cfg.rl.rewards:
        columns["item_quality"] = np.load(ctx.input(REWARD_INPUTS["quality"]) / "item_quality.npy")  # (N,)
    return columns


def run(ctx) -> dict:
    from genrec.eval.generative import evaluate_model_dir
    from genrec.model.recommender import GenerativeRecommender

    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    recommender = GenerativeRecommender.load(ctx.input("sft") / "model")  # on cuda when there is one
    summary = train_rl(ctx.cfg, dataset, recommender, ctx.out, ctx.work, extra_columns=stage_columns(ctx))
    result = evaluate_model_dir(ctx, ctx.out / "model", ctx.out / "eval", "sft+rl")
    return {**summary, **result}
