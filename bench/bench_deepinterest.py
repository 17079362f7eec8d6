"""DeepInterestGR and its ablation on ML-100K and Beauty, several seeds, with the offline miner.

    python bench/bench_deepinterest.py [--datasets ml-100k beauty] [--seeds 1 2 3] [--variants full no-ieid ...]

Each variant is one `genrec multiseed`-style run (genrec.eval.aggregate.run_seeds) into
bench/out/deepinterest/<dataset>/<variant>/seed_<s>/; the table, with the command and the
machine, goes to bench/results/deepinterest.md (rerunning one dataset keeps the others'
sections). Rows (test split, mean ± std over seeds):

- DeepInterestGR (full): interests -> rldi -> IEID text -> SFT (seqrec + interest2sid) -> RL
  with {rank, interest, quality}; its "sft+rl" metrics;
- without MLIM: no interests anywhere (plain SID text, seqrec only, rank reward);
- without RLDI: interests used uncurated (every interest positive: IEID with all of them,
  interest2sid and the interest reward over all of them);
- without IEID: item texts without interests, the rest as the full method;
- without RL: the full method's SFT model (its "sft" metrics; no extra run).

For users with an LLM endpoint: pass the backends with --set, e.g.
``--set 'interests.backends=[{name: qwen, kind: openai, base_url: "http://127.0.0.1:8000/v1", model: Qwen/Qwen2.5-7B-Instruct, api_key_env: ""}]'``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_baselines  # noqa: E402

# The datasets' generative configs (their sid, model, sft and rl sections); every variant but
# "without MLIM" adds DEEPINTEREST.
# Beauty's token-layout config: configs/beauty.yaml has the item layout since 2026-12-06, which has no RL stage.
CONFIGS = {"ml-100k": "configs/ml-100k.yaml", "beauty": "configs/beauty-tokens.yaml"}
# The DeepInterestGR sections; configs/deepinterest-ml-100k.yaml is configs/ml-100k.yaml plus
# these (a test checks it).
DEEPINTEREST = [
    "interests.backends=[{name: offline-metadata, kind: offline}]",
    "interests.max_interests=5",
    "rldi.labels=behaviour",
    "rldi.holdout=3",
    "text.template=default",
    "text.interests=positive",
    "sft.tasks={seqrec: 1.0, interest2sid: 0.5}",
    "rl.rewards={rank: 1.0, interest: 0.1, quality: 0.5}",
    "rl.targets_per_user=3",
]
# Every variant's RL as DeepInterestGR was measured: the rank reward (MLIM's variants add the
# interest terms) at lr 1e-5, from before configs/ml-100k.yaml and configs/beauty.yaml moved to
# SASRec-teacher RL: valid every 10 steps; on ml-100k 30 steps, on beauty 40 with valid on 1000 users.
RANK_RL = ["rl.rewards={rank: 1.0}", "rl.lr=1.0e-5", "rl.loss=dapo", "rl.prompts=targets"]
DATASET_OVERRIDES = {
    # Text SIDs of 3 levels, no distillation and no item-ID inputs, as measured before configs/ml-100k.yaml
    # and configs/beauty.yaml moved to 2-level collaborative SIDs and SASRec's item vectors (2026-12-06):
    # IEID folds the interests into the item texts that are quantised. Beauty also pins the dedup level
    # and the dropout of 0.1 that it ran with.
    "ml-100k": [
        *RANK_RL,
        "rl.steps=30",
        "rl.eval_every=10",
        "sid.embedding=text",
        "sid.levels=3",
        "model.item_embedding=none",
    ],
    "beauty": [
        *RANK_RL,
        "rl.steps=40",
        "rl.eval_every=10",
        "rl.eval_users=1000",
        "rl.max_minutes=8",
        "sid.embedding=text",
        "sid.levels=3",
        "sid.collision=dedup",
        "sft.distill=0.0",
        "sft.max_minutes=20",
        "model.item_embedding=none",
        "model.dropout=0.1",
    ],
}
FULL_STAGES = "stages=[prepare, popularity, sasrec, interests, rldi, text, embed, sid, sft, eval, rl]"
# The other variants' rows are their "sft+rl" metrics, so they skip the SFT model's test evaluation.
PLAIN_STAGES = "stages=[prepare, text, embed, sid, sft, rl]"
INTEREST_STAGES = "stages=[prepare, interests, rldi, text, embed, sid, sft, rl]"

# variant -> overrides on top of the dataset's generative config.
VARIANTS = {
    "full": [*DEEPINTEREST, FULL_STAGES],
    "no-mlim": [PLAIN_STAGES],
    "no-rldi": [*DEEPINTEREST, INTEREST_STAGES, "rldi.curate=false", "text.interests=all"],
    "no-ieid": [*DEEPINTEREST, INTEREST_STAGES, "text.interests=none"],
}
# Table row -> (variant run, model of genrec.eval.aggregate.METRIC_DIRS).
ROWS = {
    "popularity": ("full", "popularity"),
    "SASRec (CE)": ("full", "sasrec"),
    "DeepInterestGR (full)": ("full", "sft+rl"),
    "without MLIM": ("no-mlim", "sft+rl"),
    "without RLDI": ("no-rldi", "sft+rl"),
    "without IEID": ("no-ieid", "sft+rl"),
    "without RL": ("full", "sft"),
}


def variant_config(dataset: str, variant: str, out: Path, extra: list[str], sasrec: bool = True):
    """The dataset's config with the variant's overrides, then ``extra``; without SASRec if ``sasrec`` is false."""
    from genrec.config import load_config

    stages = list(VARIANTS[variant])
    if not sasrec:
        stages = [o.replace(" sasrec,", "") if o.startswith("stages=") else o for o in stages]
    overrides = [f"run_dir={out / dataset / variant}", *DATASET_OVERRIDES[dataset], *stages, *extra]
    return load_config(ROOT / CONFIGS[dataset], overrides)


def ablation_rows(dataset_dir: Path, seeds: list[int]) -> dict[str, dict]:
    """Table row -> metric -> {mean, std, n, values}, from the seed run directories that exist."""
    return bench_baselines.variant_rows(dataset_dir, seeds, ROWS)


def rldi_measures(dataset_dir: Path, seeds: list[int]) -> dict[str, list[float]]:
    """The full runs' RLDI held-out accuracy, majority-class accuracy and AUC, one value per seed."""
    from genrec.io import read_json

    out: dict[str, list[float]] = {}
    for s in seeds:
        path = dataset_dir / "full" / f"seed_{s}" / "rldi" / "rldi.json"
        if path.is_file():
            got = read_json(path)
            for key in ("heldout_accuracy", "heldout_majority_accuracy", "heldout_auc", "item_positive_share"):
                if got.get(key) is not None:
                    out.setdefault(key, []).append(float(got[key]))
    return out


def dataset_section(name: str, dataset_dir: Path, seeds: list[int], command: str, wall_s: float | None) -> str:
    import numpy as np

    from genrec.eval.aggregate import format_summary

    lines = [f"### {name}\n", f"Command: `{command}`; {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.\n"]  # fmt: skip
    lines.append(format_summary(ablation_rows(dataset_dir, seeds), ks=(5, 10)) + "\n")
    measures = rldi_measures(dataset_dir, seeds)
    if measures:
        cells = ", ".join(
            f"{k} {np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}" for k, v in measures.items()
        )
        lines.append(f"RLDI classifier on held-out labelled interests (full runs): {cells}.\n")
    if wall_s is not None:
        lines.append(f"Wall time (all variants and seeds): {wall_s / 60:.1f} min.\n")
    return "\n".join(lines)


def main() -> int:
    from genrec.eval.aggregate import run_seeds
    from genrec.io import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    bench_baselines.add_set_option(ap)
    ap.add_argument(
        "--no-sasrec",
        action="store_true",
        help="skip the SASRec row (bench/bench_baselines.py has it for every dataset): saves its training",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/deepinterest")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/deepinterest.md")
    args = ap.parse_args()

    sections = {}
    for name in args.datasets:
        started = time.time()
        for variant in args.variants:
            run_seeds(variant_config(name, variant, args.out, args.set, not args.no_sasrec), args.seeds)
        command = " ".join(["python bench/bench_deepinterest.py --datasets", name, "--seeds", *map(str, args.seeds)])
        if args.variants != list(VARIANTS):
            command += " --variants " + " ".join(args.variants)
        command += " --no-sasrec" * args.no_sasrec + bench_baselines.set_flags(args.set)
        sections[name] = dataset_section(name, args.out / name, args.seeds, command, time.time() - started)
    header = (
        "# DeepInterestGR ablation\n\n"
        "Test split, leave-one-out, full ranking, seen items excluded, mean ± std over the seeds, offline "
        "miner (`offline-metadata`: interests restate the catalogue, no LLM). Rows are explained in "
        "bench/bench_deepinterest.py and docs/interests.md.\n\n"
    )
    # Read the other datasets' sections only now, so that a benchmark of another dataset that
    # finished meanwhile is kept.
    sections = {**bench_baselines.previous_sections(args.results, CONFIGS), **sections}
    atomic_write_text(args.results, header + "\n".join(sections[n] for n in CONFIGS if n in sections))
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
