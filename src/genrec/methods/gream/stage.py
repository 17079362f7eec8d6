"""GREAM's stage functions: SFT with its tasks and curriculum, SRPO, and evaluation in both modes.

- :func:`run_sft` (stage ``gream_sft``): builds the reasoning chains (``chains.jsonl`` beside the
  model says which are data-derived and which a teacher wrote), then ``train_sft`` with the
  ``co2sid`` and ``gream_reason`` builders; ``sft.tasks`` chooses the mix, e.g.
  ``{seqrec: 1, item2sid: 0.5, titles2sid: 0.2, co2sid: 0.5, gream_reason: 1}``.
- :func:`run_rl` (stage ``gream_rl``): SRPO, i.e. ``train_rl`` with the ``rl`` section set as in
  ``configs/gream-ml-100k.yaml`` (rsvr reward, bgae advantage, KL 0.001, clip 0.2, dual clip
  10, token-mean loss, dynamic sampling) on direct (trie-constrained) rollouts.
- :func:`evaluate_modes`: the test harness in the direct and the reasoning mode.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from genrec.config import RunConfig
from genrec.data.dataset import Dataset
from genrec.io import atomic_write_text, write_json
from genrec.methods.gream.chains import Chain, apply_teacher, build_chains
from genrec.methods.gream.tasks import REASON_TASK, gream_builders

log = logging.getLogger("genrec")
MODES = ("direct", "reasoning")


def make_chains(cfg: RunConfig, dataset: Dataset, cache_dir: Path) -> tuple[list[Chain], dict]:
    """The chains of the training data: data-derived, then taught where ``gream.teacher`` is set."""
    categories = dataset.categories
    chains = build_chains(dataset.train_sequences(), categories, cfg.gream, cfg.data.max_history)
    stats = {"chains": len(chains), "source": "data-derived chains"}
    if cfg.gream.teacher is not None:
        from genrec.interests.backends import make_backend
        from genrec.interests.cache import CallCache

        backend = make_backend(cfg.gream.teacher, cfg.interests, dataset.items)
        cache_path = Path(cfg.gream.teacher_cache) if cfg.gream.teacher_cache else cache_dir / "calls.sqlite"
        with CallCache(cache_path) as cache:
            counts = apply_teacher(chains, backend, cache, dataset.titles, categories, cfg.gream.teacher_max_chains)
            stats.update(source=f"teacher {backend.name}", teacher=counts, cache=cache.stats())
    return chains, stats


def write_chains(path: Path, chains: list[Chain]) -> None:
    """One JSON line per chain (the SFT data, for reading and for the leakage check)."""
    rows = [
        json.dumps(
            {
                "user": c.user,
                "position": c.position,
                "history": c.history.tolist(),
                "target": c.target,
                "evidence": c.evidence,
                "preferences": c.preferences,
                "intent": c.intent,
                "rewrite": c.rewrite.tolist(),
                "source": c.source,
            }
        )
        for c in chains
    ]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def run_sft(ctx) -> dict:
    """SFT with GREAM's tasks: writes ``model/``, ``chains.jsonl`` and the SFT summary into ``ctx.out``."""
    import pandas as pd

    from genrec.train.sft import _check_codes, train_sft

    cfg = ctx.cfg
    dataset = Dataset.load(ctx.input("prepare"), cfg.data.max_history)
    codes_path = ctx.input("sid") / "codes.npy"
    try:
        codes = _check_codes(np.load(codes_path), dataset.num_items)
    except ValueError as exc:
        raise ValueError(f"{codes_path}: {exc}") from exc
    texts = pd.read_parquet(ctx.input("text") / "items_text.parquet")["text"].astype(str).tolist()
    chains = []
    if cfg.sft.tasks.get(REASON_TASK, 0) > 0:
        chains, stats = make_chains(cfg, dataset, ctx.run_dir.parent / ".cache" / "gream")
        ctx.out.mkdir(parents=True, exist_ok=True)
        write_chains(ctx.out / "chains.jsonl", chains)
        log.info("gream: %d reasoning chains (%s)", len(chains), stats["source"])
    summary = train_sft(cfg, dataset, codes, texts, ctx.out, ctx.work, extra_tasks=gream_builders(cfg.gream, chains))
    return {**summary, "reasoning_chains": len(chains)}


def evaluate_modes(
    cfg: RunConfig, dataset: Dataset, recommender, out_dir: Path, name: str, modes=MODES, splits=None
) -> dict:
    """Evaluate ``recommender`` in each mode into ``out_dir/<mode>/`` through the common harness."""
    from dataclasses import replace

    import torch

    from genrec.eval.evaluate import evaluate
    from genrec.eval.generative import beam_ranker, num_beams_for
    from genrec.methods.gream.reasoning import reasoning_ranker

    num_beams = num_beams_for(cfg, cfg.data.max_history)
    eval_cfg = replace(cfg.eval, batch_size=min(cfg.eval.batch_size, cfg.decode.batch_size))
    results = {}
    for mode in modes:
        torch.manual_seed(cfg.seed)
        if mode == "direct":
            ranker = beam_ranker(recommender, num_beams)
        elif mode == "reasoning":
            ranker = reasoning_ranker(
                recommender, num_beams, cfg.gream.max_think_tokens, cfg.gream.think_temperature, cfg.seed
            )
        else:
            raise ValueError(f"unknown inference mode {mode!r}; modes: {', '.join(MODES)}")
        results[mode] = evaluate(ranker, dataset, eval_cfg, out_dir / mode, splits, cfg.seed, f"{name} {mode}")
        if mode == "reasoning":
            results[mode]["rationales"] = _rationale_stats(ranker.stats, cfg.gream.max_think_tokens)
            write_json(out_dir / mode / "rationales.json", results[mode]["rationales"])
    return results


def _rationale_stats(stats: dict, budget: int) -> dict:
    """Share of rationales that ran out of ``gream.max_think_tokens``, and their mean length; warns when most did."""
    users = max(stats["users"], 1)
    out = {
        "users": stats["users"],
        "forced_share": round(stats["forced"] / users, 4),
        "mean_tokens": round(stats["tokens"] / users, 1),
        "max_think_tokens": budget,
    }
    if out["forced_share"] > 0.5:
        log.warning(
            "gream: %.0f%% of the rationales ran out of gream.max_think_tokens=%d before the answer marker "
            "(the answer was forced): raise it above the chains' length",
            100 * out["forced_share"],
            budget,
        )
    return out


def model_modes(recommender) -> tuple[str, ...]:
    """The inference modes ``recommender`` has: reasoning only when it was trained with the reasoning task."""
    if REASON_TASK in recommender.fmt.heads:
        return MODES
    log.info("gream: the model was not trained with %r, so it is evaluated in the direct mode only", REASON_TASK)
    return ("direct",)


def run_eval(ctx, model_dir: Path | None = None) -> dict:
    """Each mode of the GREAM SFT model (or ``model_dir``) into ``ctx.out/<mode>/`` (see :func:`model_modes`)."""
    from genrec.model.recommender import GenerativeRecommender

    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    recommender = GenerativeRecommender.load(model_dir or ctx.input("gream_sft") / "model")
    res = evaluate_modes(ctx.cfg, dataset, recommender, ctx.out, "gream", model_modes(recommender))
    return {f"{mode}_test_ndcg@10": r["test"]["ndcg@10"] for mode, r in res.items()}


def run_rl(ctx) -> dict:
    """SRPO from the GREAM SFT model (the ``rl`` section configures it), then both modes on test."""
    from genrec.model.recommender import GenerativeRecommender
    from genrec.train.rl import stage_columns, train_rl

    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    recommender = GenerativeRecommender.load(ctx.input("gream_sft") / "model")
    if ctx.cfg.gream.rl_rollout == "reasoning":
        from genrec.methods.gream.srpo import train_reasoning_srpo

        summary = train_reasoning_srpo(
            ctx.cfg, dataset, recommender, ctx.out, ctx.work, extra_columns=stage_columns(ctx)
        )
    else:
        summary = train_rl(ctx.cfg, dataset, recommender, ctx.out, ctx.work, extra_columns=stage_columns(ctx))
    res = evaluate_modes(ctx.cfg, dataset, recommender, ctx.out / "eval", "gream+srpo", model_modes(recommender))
    return {**summary, **{f"{mode}_test_ndcg@10": r["test"]["ndcg@10"] for mode, r in res.items()}}
