"""GREAM's variants over seeds: direct and reasoning mode, with and without the curriculum and SRPO.

    python bench/bench_gream.py [--datasets ml-100k beauty] [--seeds 1 2 3] [--variants full align ...] [--set key=value ...]

Each variant is a pipeline run of the dataset's GREAM config (configs/gream-<dataset>.yaml) into
bench/out/gream/<dataset>/<variant>/seed_<s>/ (seed by seed, so that a stopped benchmark
leaves whole seeds); the table, with the command and the machine, goes to
bench/results/gream.md (rerunning one dataset keeps the others' sections). Rows (test split,
every test user, full ranking, mean ± std over seeds):

- curriculum: the config as shipped (alignment tasks + data-derived reasoning chains with
  the five-stage curriculum), its ``gream_eval`` in the direct and the reasoning mode;
- curriculum + SRPO: the same model after ``gream_rl`` (SRPO on reasoning rollouts);
- no curriculum: full chains from the first epoch (``gream.curriculum_epochs=0``);
- alignment only: the alignment tasks without the reasoning task (direct mode only: a model
  never trained to reason has no reasoning mode).

Latency (ms per test user, the harness's measure) comes from the same evaluations.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_baselines  # noqa: E402

CONFIGS = {"ml-100k": "configs/gream-ml-100k.yaml", "beauty": "configs/gream-beauty.yaml"}
SFT_STAGES = "stages=[prepare, text, embed, sid, gream_sft, gream_eval]"
VARIANTS = ("full", "align", "no-curriculum")
# Table row -> (variant run, model of genrec.eval.aggregate.METRIC_DIRS).
ROWS = {
    "curriculum (direct)": ("full", "gream (direct)"),
    "curriculum (reasoning)": ("full", "gream (reasoning)"),
    "curriculum + SRPO (direct)": ("full", "gream+srpo (direct)"),
    "curriculum + SRPO (reasoning)": ("full", "gream+srpo (reasoning)"),
    "no curriculum (direct)": ("no-curriculum", "gream (direct)"),
    "no curriculum (reasoning)": ("no-curriculum", "gream (reasoning)"),
    "alignment only (direct)": ("align", "gream (direct)"),
}


def variant_config(dataset: str, variant: str, out: Path, extra: list[str]):
    """The dataset's GREAM config with the variant's overrides, run into ``out/dataset/variant``."""
    from genrec.config import load_config
    from genrec.methods.gream.tasks import REASON_TASK

    base = load_config(ROOT / CONFIGS[dataset], extra)
    overrides = {
        "full": [],
        "no-curriculum": [SFT_STAGES, "gream.curriculum_epochs=0"],
        "align": [
            SFT_STAGES,
            "sft.tasks={" + ", ".join(f"{t}: {w}" for t, w in base.sft.tasks.items() if t != REASON_TASK) + "}",
        ],
    }[variant]
    return load_config(ROOT / CONFIGS[dataset], [f"run_dir={out / dataset / variant}", *overrides, *extra])


def variant_rows(dataset_dir: Path, seeds: list[int]) -> dict[str, dict]:
    """Table row -> metric -> {mean, std, n, values}, from the seed run directories that exist."""
    return bench_baselines.variant_rows(dataset_dir, seeds, ROWS)


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):{fmt}} ± {std:{fmt}}"


def training_rows(dataset_dir: Path, seeds: list[int]) -> str:
    """Per variant: SFT epochs, best valid NDCG@10, SFT minutes, SRPO steps and whether SRPO's weights were kept."""
    from genrec.io import read_json

    lines = [
        "| variant | SFT epochs | SFT best valid NDCG@10 | SFT min | SRPO steps | SRPO valid NDCG@10 (SFT's) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        sft, rl = [], []
        for s in seeds:
            path = dataset_dir / variant / f"seed_{s}" / "gream_sft" / "done.json"
            if path.is_file():
                sft.append(read_json(path)["summary"])
            path = dataset_dir / variant / f"seed_{s}" / "gream_rl" / "done.json"
            if path.is_file():
                rl.append(read_json(path)["summary"])
        if not sft:
            continue
        rl_cells = ["-", "-"]
        if rl:
            rl_cells = [
                _mean_std([float(r["steps"]) for r in rl], ".0f"),
                _mean_std([float(r["best_valid_ndcg@10"]) for r in rl], ".4f")
                + f" ({_mean_std([float(r['sft_valid_ndcg@10']) for r in rl], '.4f')})",
            ]
        cells = [
            _mean_std([float(r["epochs"]) for r in sft], ".1f"),
            _mean_std([float(r["best_valid_ndcg@10"]) for r in sft], ".4f"),
            _mean_std([r["train_seconds"] / 60 for r in sft], ".1f"),
            *rl_cells,
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _forced(dataset_dir: Path, seeds: list[int], row: str) -> str:
    """For a reasoning row: the share of rationales whose budget ran out, and their length (rationales.json)."""
    from genrec.eval.aggregate import METRIC_DIRS
    from genrec.io import read_json

    variant, model = ROWS[row]
    paths = [dataset_dir / variant / f"seed_{s}" / METRIC_DIRS[model] / "rationales.json" for s in seeds]
    stats = [read_json(p) for p in paths if p.is_file()]
    if not stats:
        return ""
    forced = _mean_std([100 * r["forced_share"] for r in stats], ".1f")
    tokens = _mean_std([r["mean_tokens"] for r in stats], ".1f")
    return f"; rationale {tokens} tokens, {forced}% forced (budget {stats[0]['max_think_tokens']})"


def dataset_section(name: str, dataset_dir: Path, seeds: list[int], command: str, wall_s: float) -> str:
    from genrec.eval.aggregate import format_summary
    from genrec.io import read_json

    rows = variant_rows(dataset_dir, seeds)
    stats = read_json(dataset_dir / "full" / f"seed_{seeds[0]}" / "prepare" / "stats.json")
    latency = "\n".join(
        f"- {row}: {_mean_std(m['ms_per_user']['values'], '.1f')}{_forced(dataset_dir, seeds, row)}"
        for row, m in rows.items()
        if "ms_per_user" in m
    )
    return (
        f"### {name}: {stats['users']:,} users, {stats['items']:,} items\n\n"
        f"Command: `{command}`; {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; wall {wall_s / 60:.1f} min.\n\n"
        f"{format_summary(rows, ks=(5, 10, 20))}\n\n"
        f"ms per test user (evaluation, batch of the eval section):\n\n{latency}\n\n"
        f"Training (mean ± std over seeds):\n\n{training_rows(dataset_dir, seeds)}\n"
    )


def main() -> int:
    from genrec.io import atomic_write_text
    from genrec.pipeline import run_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ml-100k"], choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    bench_baselines.add_set_option(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/gream")
    args = ap.parse_args()

    results = ROOT / "bench/results/gream.md"
    sections = {}
    for name in args.datasets:
        started = time.time()
        for seed in args.seeds:
            for variant in args.variants:
                cfg = variant_config(name, variant, args.out, args.set)
                run_pipeline(_seeded(cfg, seed))
        command = f"python bench/bench_gream.py --datasets {name} --seeds {' '.join(map(str, args.seeds))}"
        command += bench_baselines.set_flags(args.set)
        sections[name] = dataset_section(name, args.out / name, args.seeds, command, time.time() - started)
    header = (
        "# GREAM: direct and reasoning mode, with and without the curriculum and SRPO\n\n"
        "Test split, leave-one-out, full ranking over all items, seen items excluded, mean ± std over the "
        "seeds; data-derived reasoning chains (no teacher LLM). Rows are explained in bench/bench_gream.py "
        "and docs/gream.md. Each dataset's section gives its command and machine.\n\n"
    )
    sections = {**bench_baselines.previous_sections(results, CONFIGS), **sections}
    atomic_write_text(results, header + "\n".join(sections[n] for n in CONFIGS if n in sections))
    print(results.read_text())
    return 0


def _seeded(cfg, seed: int):
    """``cfg`` with ``seed``, run into ``<run_dir>/seed_<seed>`` (the layout of genrec.eval.aggregate.run_seeds)."""
    import dataclasses

    return dataclasses.replace(cfg, seed=seed, run_dir=str(Path(cfg.run_dir) / f"seed_{seed}"))


if __name__ == "__main__":
    sys.exit(main())
