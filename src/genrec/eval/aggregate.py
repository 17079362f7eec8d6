"""Several seeds of one config: mean and standard deviation of every metric."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from genrec.config import RunConfig
from genrec.io import atomic_write_text, read_json, write_json

# Table row name -> where its metrics.json lives in a run directory.
METRIC_DIRS = {
    "popularity": "popularity/eval",
    "sasrec": "sasrec/eval",
    "sft": "eval",
    "sft+rl": "rl/eval",
    "gream (direct)": "gream_eval/direct",
    "gream (reasoning)": "gream_eval/reasoning",
    "gream+srpo (direct)": "gream_rl/eval/direct",
    "gream+srpo (reasoning)": "gream_rl/eval/reasoning",
    "trm alone": "trm/eval",
    "deeprec sft (direct)": "agent_eval/direct",
    "deeprec sft (agent)": "agent_eval/agent",
    "deeprec+rl (direct)": "agent_rl/eval/direct",
    "deeprec+rl (agent)": "agent_rl/eval/agent",
}


def collect(run_dirs: list[Path], split: str = "test") -> dict[str, dict[str, list[float]]]:
    """model -> metric -> one value per run directory that has it."""
    out: dict[str, dict[str, list[float]]] = {}
    for run_dir in run_dirs:
        for model, rel in METRIC_DIRS.items():
            path = Path(run_dir) / rel / "metrics.json"
            if not path.is_file():
                continue
            res = read_json(path)[split]
            for key, val in res.items():
                if key.startswith(("hr@", "ndcg@")) or key == "ms_per_user":
                    out.setdefault(model, {}).setdefault(key, []).append(float(val))
    return out


def summarise(values: dict[str, dict[str, list[float]]]) -> dict:
    return {
        model: {
            k: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v),
                "values": v,
            }
            for k, v in metrics.items()
        }
        for model, metrics in values.items()
    }


def format_summary(summary: dict, ks: tuple[int, ...] = (5, 10, 20)) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
    lines = ["| model | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for model, metrics in summary.items():
        n = max(m["n"] for m in metrics.values())
        cells = [f"{metrics[c]['mean']:.4f} ± {metrics[c]['std']:.4f}" if c in metrics else "-" for c in cols]
        lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seeds(cfg: RunConfig, seeds: list[int], force: list[str] | None = None) -> str:
    from genrec.pipeline import run_pipeline

    base = Path(cfg.run_dir)
    run_dirs = []
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed, run_dir=str(base / f"seed_{seed}"))
        run_pipeline(seed_cfg, force=force)
        run_dirs.append(base / f"seed_{seed}")
    summary = summarise(collect(run_dirs))
    table = format_summary(summary)
    write_json(base / "summary.json", {"seeds": seeds, "split": "test", "models": summary})
    atomic_write_text(base / "summary.md", f"Test split, mean ± std over seeds {seeds}.\n\n{table}\n")
    return table
