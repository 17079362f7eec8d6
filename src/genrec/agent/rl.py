"""DeepRec's RL: REINFORCE++ with a group baseline on multi-turn trajectories, in two stages.

Each step draws ``agent.batch_size`` training prompts (a user's training history and the next
training item, ``genrec.train.rl.training_prompts``; prompts whose target the TRM alone ranks
below ``agent.trm_top`` are dropped, as DeepRec does), plays ``agent.group_size`` sampled
trajectories of each (``run_agent`` at ``agent.rollout_temperature``, the top answer drawn
from the candidate scores), scores them with the hierarchical rewards of the current stage
(``agent.stage1_rewards`` for the first ``stage1_steps`` steps: learn to interact; then
``stage2_rewards``: learn to recommend), and takes one gradient step on

    loss = - sum_i A_i sum_{t in LLM tokens of i} log pi(y_t | y_<t) / (number of LLM tokens)

with A the group-baseline advantage whitened over the batch (``group_baseline_advantages``).
The top answer, drawn from the softmax of the candidates' SID log-probabilities, takes loss
through its SID tokens' log-probability (a raised score raises its softmax share, but the
gradient of the softmax's normaliser is left out: an approximation).
Only tokens the LLM wrote take loss: the tool's lists and forced tags are masked. One update
per rollout keeps the update on-policy, so the PPO ratio is 1 and DeepRec's clipping never
acts; DeepRec uses no KL either. Every ``eval_every`` steps the agent mode is evaluated on a
fixed sample of valid users and the best weights are kept. Resumable from ``work_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from genrec.agent.loop import AgentFormat, run_agent
from genrec.agent.rewards import combine, group_baseline_advantages
from genrec.data.dataset import Dataset

log = logging.getLogger("genrec")


def trajectory_columns(rollout, targets: np.ndarray, retriever) -> dict[str, np.ndarray]:
    """The reward columns of each trajectory (see ``genrec.agent.rewards``)."""
    trs = rollout.transcripts
    cos = np.full(len(trs), np.nan)
    for i, tr in enumerate(trs):
        prefs = [t.preference for t in tr.calls]
        if len(prefs) >= 2:
            emb = retriever.embed_preferences(prefs)  # (c, D), normalised
            sim = (emb @ emb.T).numpy()
            cos[i] = sim[np.triu_indices(len(prefs), 1)].mean()
    return {
        "well_formed": np.asarray([tr.closed and tr.malformed == 0 and bool(tr.calls) for tr in trs]),
        "num_calls": np.asarray([len(tr.calls) for tr in trs]),
        "pref_cosine": cos,
        "target_retrieved": np.asarray([int(t) in tr.candidates() for tr, t in zip(trs, targets)]),
        "target_rank": np.asarray(
            [tr.answer.index(int(t)) if int(t) in tr.answer else -1 for tr, t in zip(trs, targets)]
        ),
    }


def policy_loss(model, ids: list[list[int]], generated: list[list[bool]], advantages: np.ndarray, pad_id: int):
    """The REINFORCE++ loss of a batch of trajectories (the module docstring), and the LLM-token count."""
    from genrec.train.rl import sequence_log_probs

    logp, token_mask = sequence_log_probs(model, ids, generated, pad_id)  # (n, T-1) each
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=logp.device)[:, None]
    count = token_mask.sum().clamp(min=1.0)
    return -(adv * logp * token_mask).sum() / count, int(token_mask.sum())


def train_agent_rl(cfg, dataset: Dataset, recommender, retriever, out_dir: Path, work_dir: Path) -> dict:
    """Two-stage RL of ``recommender`` in place; keeps the best valid weights; writes curves and a plot."""
    recommender.check_free_text("DeepRec's agent RL")
    from tqdm import tqdm

    from genrec.eval.evaluate import rank_examples
    from genrec.eval.metrics import ndcg_at_k, target_ranks
    from genrec.train.rl import sample_examples, training_prompts
    from genrec.train.rl_run import RLRun

    a = cfg.agent
    if cfg.rl.prompts != "targets":
        raise ValueError(
            f"rl.prompts={cfg.rl.prompts}: the agent's outcome reward scores the final ranking against the target, "
            "use rl.prompts=targets"
        )
    model, fmt = recommender.model, recommender.fmt
    agent_fmt = AgentFormat(recommender, dataset.titles, a)
    train = dataset.train_sequences()
    prompts = training_prompts(dataset, cfg.rl.targets_per_user, cfg.data.max_history)
    # Every training item before the target is seen (the history may be cut at max_history);
    # the same positions, in the same order, as training_prompts.
    seen = [seq[:p] for seq in train for p in range(max(1, len(seq) - cfg.rl.targets_per_user), len(seq))]
    keep = np.arange(len(prompts))
    if a.trm_top > 0:
        ranks = []
        for s in range(0, len(prompts), 512):
            chunk = prompts.histories[s : s + 512]
            ids, _ = retriever.retrieve(
                chunk, [None] * len(chunk), min(a.trm_top, retriever.num_items), seen[s : s + 512]
            )
            ranks += [t in row for t, row in zip(prompts.targets[s : s + 512], ids)]
        keep = np.flatnonzero(ranks)
    if len(keep) == 0:
        raise ValueError(
            f"no RL prompt has its target in the TRM's top {a.trm_top}: raise agent.trm_top or set it to 0"
        )
    valid = sample_examples(dataset.examples("valid"), a.eval_users, cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    total_steps = a.stage1_steps + a.stage2_steps
    k = max(cfg.eval.ks)

    def valid_ndcg() -> float:
        from dataclasses import replace

        from genrec.agent.loop import agent_ranker

        eval_cfg = replace(cfg.eval, batch_size=min(cfg.eval.batch_size, cfg.decode.batch_size), ks=[10])
        ranker = agent_ranker(recommender, retriever, dataset.titles, a, k, cfg.seed, agent_fmt=agent_fmt)
        ranked = rank_examples(ranker, valid, eval_cfg, dataset.num_items, desc="agent rl valid")
        return ndcg_at_k(target_ranks(ranked, valid.targets), 10)

    run = RLRun("agent rl", model, opt, work_dir, valid_ndcg, curves_name="curves.jsonl")
    bar = tqdm(total=total_steps, initial=run.step, desc="agent rl", unit="step")
    while run.step < total_steps:
        step = run.step  # 0-based here: the stage switch and the batch seeds count from 0
        stage = 1 if step < a.stage1_steps else 2
        weights = a.stage1_rewards if stage == 1 else a.stage2_rewards
        rng = np.random.default_rng([cfg.seed, step])
        pick = rng.choice(keep, size=min(a.batch_size, len(keep)), replace=False)
        rep = np.repeat(pick, a.group_size)
        gen = torch.Generator(device=recommender.device).manual_seed(int(rng.integers(2**31)))
        model.eval()  # rollouts and loss without dropout: the sampled policy is the one trained
        rollout = run_agent(
            recommender,
            retriever,
            agent_fmt,
            [prompts.histories[i] for i in rep],
            [seen[i] for i in rep],
            a,
            k,
            a.rollout_temperature,
            True,
            gen,
        )
        targets = prompts.targets[rep]
        cols = trajectory_columns(rollout, targets, retriever)
        total, parts = combine(weights, **cols)
        adv = group_baseline_advantages(total.reshape(len(pick), a.group_size)).reshape(-1)
        loss, tokens = policy_loss(model, rollout.ids, rollout.generated, adv, fmt.pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.rl.grad_clip)
        opt.step()
        row = {
            "step": step + 1,
            "stage": stage,
            "loss": float(loss.detach()),
            "reward": float(total.mean()),
            **{f"reward_{n}": float(v.mean()) for n, v in parts.items()},
            "hit_rate": float((cols["target_rank"] == 0).mean()),
            "recall": float(cols["target_retrieved"].mean()),
            "calls": float(cols["num_calls"].mean()),
            "well_formed": float(cols["well_formed"].mean()),
            "llm_tokens": tokens,
        }
        over_budget = run.over_budget(a.max_minutes)
        last = step + 1 == total_steps or over_budget
        run.end_step(row, evaluate=(step + 1) % a.eval_every == 0 or last, save=True)
        bar.update(1)
        bar.set_postfix(stage=stage, reward=f"{row['reward']:.3f}", calls=f"{row['calls']:.2f}")
        if over_budget:
            log.info("agent rl: stopping at the %.1f-minute budget after %d steps", a.max_minutes, run.step)
            break
    bar.close()
    return run.finish(recommender, out_dir, prompts=len(prompts), prompts_kept=int(len(keep)))
