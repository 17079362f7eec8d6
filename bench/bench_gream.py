"""GREAM variants on one prepared run directory: direct and reasoning mode, with and without curriculum and SRPO.

    genrec run configs/gream-ml-100k.yaml run_dir=RUN 'stages=[prepare,text,embed,sid]'
    nice -n 10 python bench/bench_gream.py configs/gream-ml-100k.yaml RUN OUT [key=value ...]

Variants (the config's settings otherwise):
- ``align``: alignment tasks only (seqrec, item2sid, titles2sid, co2sid); direct mode;
- ``reason``: + ``gream_reason`` with full chains from the first epoch (no curriculum);
- ``curriculum``: + ``gream_reason`` with the five-stage curriculum (``gream.curriculum_epochs``);
- ``curriculum+srpo``: the ``curriculum`` model after SRPO (the ``rl`` section).
Each is evaluated on every test user (``eval`` section), HR/NDCG and ms per user; results go to
``OUT/results.json`` and a markdown table to ``OUT/results.md``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genrec.config import load_config, to_dict
from genrec.data.dataset import Dataset
from genrec.io import write_json
from genrec.methods.gream.stage import evaluate_modes, make_chains
from genrec.methods.gream.tasks import REASON_TASK, gream_builders
from genrec.model.recommender import GenerativeRecommender
from genrec.train.rl import train_rl
from genrec.train.sft import train_sft


def main(config: str, run_dir: str, out: str, *overrides: str) -> None:
    torch.set_num_threads(2)
    cfg = load_config(config, [f"run_dir={run_dir}", *overrides])
    run, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.load(run / "prepare", cfg.data.max_history)
    codes = np.load(run / "sid" / "codes.npy")
    texts = pd.read_parquet(run / "text" / "items_text.parquet")["text"].astype(str).tolist()
    chains, chain_stats = make_chains(cfg, dataset, out / "cache")
    align_tasks = {name: w for name, w in cfg.sft.tasks.items() if name != REASON_TASK}
    variants = {
        "curriculum": (cfg, ("direct", "reasoning")),
        "reason": (replace(cfg, gream=replace(cfg.gream, curriculum_epochs=0)), ("direct", "reasoning")),
        "align": (replace(cfg, sft=replace(cfg.sft, tasks=align_tasks)), ("direct",)),
    }
    results = {"config": to_dict(cfg), "chains": chain_stats, "variants": {}}

    def record(name: str, res: dict, extra: dict) -> None:
        results["variants"][name] = {
            **extra,
            **{
                mode: {k: r["test"][k] for k in ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "ms_per_user")}
                for mode, r in res.items()
            },
        }
        write_json(out / "results.json", results)
        print(name, json.dumps(results["variants"][name]), flush=True)

    # The curriculum model first: SRPO starts from it, and the slower baselines come last.
    for name, (vcfg, modes) in variants.items():
        started = time.perf_counter()
        summary = train_sft(
            vcfg,
            dataset,
            codes,
            texts,
            out / name / "sft",
            out / name / "work",
            extra_tasks=gream_builders(vcfg.gream, chains),
        )
        recommender = GenerativeRecommender.load(out / name / "sft" / "model", device="cpu")
        res = evaluate_modes(vcfg, dataset, recommender, out / name / "eval", name, modes, splits=("test",))
        record(
            name,
            res,
            {
                "sft_epochs": summary["epochs"],
                "best_valid_ndcg@10": summary["best_valid_ndcg@10"],
                "sft_seconds": summary["train_seconds"],
                "seconds": round(time.perf_counter() - started),
            },
        )
        if name != "curriculum":
            continue
        started = time.perf_counter()
        summary = train_rl(cfg, dataset, recommender, out / "srpo" / "rl", out / "srpo" / "work")
        res = evaluate_modes(cfg, dataset, recommender, out / "srpo" / "eval", "curriculum+srpo", splits=("test",))
        record(
            "curriculum+srpo",
            res,
            {
                "rl_steps": summary["steps"],
                "best_valid_ndcg@10": summary["best_valid_ndcg@10"],
                "sft_valid_ndcg@10": summary["sft_valid_ndcg@10"],
                "seconds": round(time.perf_counter() - started),
            },
        )

    lines = ["| variant | mode | HR@10 | NDCG@10 | HR@20 | NDCG@20 | ms/user |", "|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        for mode in ("direct", "reasoning"):
            if mode in v:
                m = v[mode]
                lines.append(
                    f"| {name} | {mode} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@20']:.4f} | "
                    f"{m['ndcg@20']:.4f} | {m['ms_per_user']:.1f} |"
                )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
