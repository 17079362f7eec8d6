"""Classic baselines on the three datasets, several seeds: popularity and SASRec (full-softmax CE).

    python bench/bench_baselines.py [--datasets ml-100k beauty scientific] [--seeds 1 2 3]

Runs `genrec multiseed` per dataset into bench/out/baselines/<dataset>/ and writes
bench/results/baselines.md: mean ± std over seeds of the test metrics, training time,
the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ml-100k": "configs/ml-100k.yaml", "beauty": "configs/beauty.yaml", "scientific": "configs/scientific.yaml"}


def add_set_option(ap: argparse.ArgumentParser) -> None:
    """The benches' repeatable ``--set KEY=VALUE`` (config overrides for every run of the benchmark)."""
    ap.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides for every run"
    )


def set_flags(overrides: list[str]) -> str:
    """``overrides`` as the shell-quoted ``--set`` flags of a recorded, runnable command."""
    return "".join(f" --set {shlex.quote(o)}" for o in overrides)


def previous_sections(path: Path, names=CONFIGS) -> dict[str, str]:
    """The per-dataset sections (``### name`` or ``### name: ...``) of an earlier results file, keyed by dataset name."""
    if not path.is_file():
        return {}
    sections = {}
    for chunk in path.read_text().split("\n### ")[1:]:
        name = chunk.split("\n", 1)[0].split(":", 1)[0].strip()  # "### beauty: 22,363 users" or "### beauty"
        if name in names:
            sections[name] = "### " + chunk.rstrip("\n") + "\n"
    return sections


def variant_rows(dataset_dir: Path, seeds: list[int], rows: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """Table row -> metric -> {mean, std, n, values}; ``rows`` maps a row to (variant, model of METRIC_DIRS).

    Each variant's runs are ``dataset_dir/<variant>/seed_<s>``; rows whose model has no metrics
    in any of them are left out.
    """
    from genrec.eval.aggregate import collect, summarise

    out = {}
    for row, (variant, model) in rows.items():
        runs = [dataset_dir / variant / f"seed_{s}" for s in seeds]
        summary = summarise(collect([r for r in runs if r.is_dir()]))
        if model in summary:
            out[row] = summary[model]
    return out


def main() -> int:
    from genrec.config import load_config
    from genrec.eval.aggregate import collect, format_summary, run_seeds, summarise
    from genrec.io import atomic_write_text, read_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/baselines")
    args = ap.parse_args()

    out = ROOT / "bench/results/baselines.md"
    sections = {}
    for name in args.datasets:
        run_dir = args.out / name
        cfg = load_config(ROOT / CONFIGS[name], [f"run_dir={run_dir}", "stages=[prepare, popularity, sasrec]"])
        started = time.time()
        run_seeds(cfg, args.seeds)
        wall = time.time() - started
        run_dirs = [run_dir / f"seed_{s}" for s in args.seeds]
        summary = summarise(collect(run_dirs))
        stats = read_json(run_dirs[0] / "prepare/stats.json")
        train_s = [read_json(d / "sasrec/done.json")["summary"]["train_seconds"] for d in run_dirs]
        sections[name] = (
            f"### {name}: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions\n\n"
            f"Command: `python bench/bench_baselines.py --datasets {name} --seeds {' '.join(map(str, args.seeds))}`; "
            f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}.\n\n"
            f"{format_summary(summary)}\n\n"
            f"SASRec training time per seed: {', '.join(f'{s / 60:.1f} min' for s in train_s)}; "
            f"wall time for the dataset (all seeds, both models): {wall / 60:.1f} min.\n"
        )
    header = (
        "# Classic baselines\n\n"
        "Test split, leave-one-out, full ranking, seen items excluded, mean ± std over the seeds. "
        "Each dataset's section gives the command and machine that produced it; rerunning one dataset "
        "keeps the others' sections.\n\n"
    )
    # Read the other datasets' sections only now, so that benchmarks of other datasets that
    # finished while this one ran are kept.
    sections = {**previous_sections(out), **sections}
    ordered = [sections[n] for n in CONFIGS if n in sections]
    atomic_write_text(out, header + "\n".join(ordered))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
