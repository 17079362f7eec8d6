"""DeepRec's stage functions: warm-up SFT on TRM trajectories, two-stage RL, and evaluation.

- :func:`run_sft` (stage ``agent_sft``): trajectories from the TRM (``trajectories.jsonl`` beside
  the model), then ``train_sft`` with the ``deeprec`` task builder mixed with the config's
  other tasks (``sft.tasks``, e.g. ``{seqrec: 1, deeprec: 1}``).
- :func:`run_eval` (stage ``agent_eval``): the common harness in agent mode and in direct mode
  (trie-constrained beam search of the same model), plus the protocol's statistics and a
  sample of test transcripts.
- :func:`run_rl` (stage ``agent_rl``): ``genrec.agent.rl.train_agent_rl`` from the warm-up
  model, then the same evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from genrec.agent.protocol import CALL, MALFORMED, Transcript
from genrec.agent.trajectories import Trajectory, agent_builders, build_trajectories
from genrec.data.dataset import Dataset
from genrec.io import atomic_write_text, write_json

log = logging.getLogger("genrec")
TRANSCRIPT_SAMPLE = 50


def write_trajectories(path: Path, trajs: list[Trajectory]) -> None:
    rows = [
        json.dumps(
            {
                "user": t.user,
                "position": t.position,
                "history": t.history.tolist(),
                "target": t.target,
                "reasoning": t.reasoning,
                "preferences": t.preferences,
                "retrieved": [r.tolist() for r in t.retrieved],
                "answer": t.answer.tolist(),
            }
        )
        for t in trajs
    ]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def run_sft(ctx) -> dict:
    """Warm-up SFT: writes ``model/``, ``trajectories.jsonl`` and the SFT summary into ``ctx.out``."""
    import pandas as pd

    from genrec.agent.trm import Retriever
    from genrec.train.sft import _check_codes, train_sft

    cfg = ctx.cfg
    dataset = Dataset.load(ctx.input("prepare"), cfg.data.max_history)
    codes = _check_codes(np.load(ctx.input("sid") / "codes.npy"), dataset.num_items)
    texts = pd.read_parquet(ctx.input("text") / "items_text.parquet")["text"].astype(str).tolist()
    retriever = Retriever.load(ctx.run_dir)
    started = time.perf_counter()
    trajs = build_trajectories(
        dataset.train_sequences(), dataset.categories, retriever, cfg.agent, cfg.data.max_history
    )
    hit = float(np.mean([t.target in set(np.concatenate(t.retrieved).tolist()) for t in trajs])) if trajs else 0.0
    log.info(
        "agent: %d warm-up trajectories in %.1fs; the target is retrieved in %.1f%%",
        len(trajs),
        time.perf_counter() - started,
        100 * hit,
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_trajectories(ctx.out / "trajectories.jsonl", trajs)
    summary = train_sft(cfg, dataset, codes, texts, ctx.out, ctx.work, extra_tasks=agent_builders(trajs, cfg.agent))
    return {**summary, "trajectories": len(trajs), "trajectory_target_retrieved": round(hit, 4)}


def protocol_stats(transcripts: list[Transcript], seconds: float) -> dict:
    """Turns, calls and format of a list of transcripts (the issue's 'share of well-formed tool calls')."""
    attempts = sum(t.kind in (CALL, MALFORMED) for tr in transcripts for t in tr.turns)
    calls = sum(len(tr.calls) for tr in transcripts)
    n = max(len(transcripts), 1)
    return {
        "users": len(transcripts),
        "calls_per_user": round(calls / n, 3),
        "turns_per_user": round(sum(len(tr.turns) for tr in transcripts) / n, 3),
        "well_formed_call_share": round(calls / attempts, 4) if attempts else None,
        "malformed_turns": sum(tr.malformed for tr in transcripts),
        "closed_by_model_share": round(sum(tr.closed for tr in transcripts) / n, 4),
        "users_without_call": sum(not tr.calls for tr in transcripts),
        "candidates_per_user": round(sum(len(tr.candidates()) for tr in transcripts) / n, 2),
        "ms_per_user": round(1000 * seconds / n, 2),
    }


def evaluate_agent(cfg, dataset: Dataset, recommender, retriever, out_dir: Path, name: str) -> dict:
    """Agent mode and direct mode through the common harness into ``out_dir/agent`` and ``out_dir/direct``."""
    from dataclasses import replace

    import torch

    from genrec.agent.loop import agent_ranker
    from genrec.eval.evaluate import evaluate
    from genrec.eval.generative import beam_ranker, num_beams_for

    k = max(cfg.eval.ks)
    eval_cfg = replace(cfg.eval, batch_size=min(cfg.eval.batch_size, cfg.decode.batch_size))
    torch.manual_seed(cfg.seed)
    transcripts: list[Transcript] = []
    started = time.perf_counter()
    ranker = agent_ranker(recommender, retriever, dataset.titles, cfg.agent, k, cfg.seed, log=transcripts)
    agent = evaluate(ranker, dataset, eval_cfg, out_dir / "agent", seed=cfg.seed, model_name=f"{name} agent")
    stats = protocol_stats(transcripts, time.perf_counter() - started)
    # The last len(test) transcripts are the test split's, in the order of dataset.examples("test").
    test = dataset.examples("test")
    sample = [
        {"user_id": int(u), "target": dataset.titles[int(t)], **tr.to_json(dataset.titles)}
        for u, t, tr in list(zip(test.user_ids, test.targets, transcripts[-len(test) :]))[:TRANSCRIPT_SAMPLE]
    ]
    atomic_write_text(out_dir / "agent" / "transcripts.jsonl", "".join(json.dumps(r) + "\n" for r in sample))
    write_json(out_dir / "agent" / "protocol.json", stats)
    direct = evaluate(
        beam_ranker(recommender, num_beams_for(cfg, cfg.data.max_history)),
        dataset,
        eval_cfg,
        out_dir / "direct",
        seed=cfg.seed,
        model_name=f"{name} direct",
    )
    return {"agent": agent, "direct": direct, "protocol": stats}


def _summary(res: dict) -> dict:
    return {
        "agent_test_ndcg@10": res["agent"]["test"]["ndcg@10"],
        "agent_test_hr@10": res["agent"]["test"]["hr@10"],
        "direct_test_ndcg@10": res["direct"]["test"]["ndcg@10"],
        **{f"protocol_{k}": v for k, v in res["protocol"].items()},
    }


def run_eval(ctx) -> dict:
    from genrec.agent.trm import Retriever
    from genrec.model.recommender import GenerativeRecommender

    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    recommender = GenerativeRecommender.load(ctx.input("agent_sft") / "model")
    res = evaluate_agent(ctx.cfg, dataset, recommender, Retriever.load(ctx.run_dir), ctx.out, "deeprec")
    return _summary(res)


def run_rl(ctx) -> dict:
    from genrec.agent.rl import train_agent_rl
    from genrec.agent.trm import Retriever
    from genrec.model.recommender import GenerativeRecommender

    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    recommender = GenerativeRecommender.load(ctx.input("agent_sft") / "model")
    retriever = Retriever.load(ctx.run_dir)
    summary = train_agent_rl(ctx.cfg, dataset, recommender, retriever, ctx.out, ctx.work)
    res = evaluate_agent(ctx.cfg, dataset, recommender, retriever, ctx.out / "eval", "deeprec+rl")
    return {**summary, **_summary(res)}
