"""The generative recommender (SFT, then RL from its checkpoint) next to SASRec, over seeds,
with an ablation over RL rewards.

    python bench/bench_generative.py [--datasets ml-100k beauty scientific] [--seeds 1 2 3] \
        [--rewards rank exact rsvr ...] [--set KEY=VALUE ...]

Per dataset and seed, one run of `configs/<dataset>.yaml` with stages
[prepare, popularity, sasrec, text, embed, sid, sft, eval, rl] (without rl for a config of the
item layout, `model.layout: items`, which has no RL stage) into
bench/out/baselines/<dataset>/seed_<s>/, the run directories of bench/bench_baselines.py: the
baseline stages have the same config there, so a seed whose SASRec already ran is not trained
again (the pipeline skips a finished stage whose config and inputs are unchanged), and SASRec
and the generative model come from the same runs either way.

Then, per reward variant (--rewards, see REWARD_VARIANTS), the seed's run directory is copied
without its `rl` stage to bench/out/generative/<dataset>/rl-<variant>/seed_<s>/ and only `rl`
runs there with that variant's `rl` overrides: every variant starts from the same SFT checkpoint.

Writes bench/results/generative.md: per dataset, the test metrics (mean ± std over seeds) of
popularity, SASRec, SFT and SFT+RL with each reward variant; the RL gain over the run's own
SFT model, per seed and as mean ± std; SFT's epochs, tokens/s and time. Rerunning one dataset
keeps the others' sections.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_baselines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ml-100k": "configs/ml-100k.yaml", "beauty": "configs/beauty.yaml", "scientific": "configs/scientific.yaml"}
STAGES = "stages=[prepare, popularity, sasrec, text, embed, sid, sft, eval, rl]"
STAGES_NO_RL = "stages=[prepare, popularity, sasrec, text, embed, sid, sft, eval]"  # model.layout: items
# variant -> rl overrides. The config's own rewards are the main run's ("config").
# The variants measured before the configs moved to the listwise loss on unlabelled histories
# (2026-12-04) pin the GRPO loss on target prompts, and the lr they ran at; the configs' steps.
GRPO = ["rl.loss=dapo", "rl.prompts=targets"]
TRM_LOGP = "rl.rewards={trm_logp: 1.0}"  # the ml-100k and beauty configs' reward; scientific's is rank
LISTWISE_HISTORIES = [TRM_LOGP, "rl.loss=listwise", "rl.prompts=histories", "rl.lr=3.0e-4", "rl.eval_every=5"]
REWARD_VARIANTS = {
    "rank": [*GRPO, "rl.rewards={rank: 1.0}", "rl.lr=1.0e-5"],
    "exact": [*GRPO, "rl.rewards={exact: 1.0}", "rl.lr=1.0e-5"],
    "rsvr": [*GRPO, "rl.rewards={rsvr: 1.0}", "rl.lr=1.0e-5"],
    "rank+semantic": [*GRPO, "rl.rewards={rank: 1.0, semantic: 0.2}", "rl.lr=1.0e-5"],
    "rank+trm": [*GRPO, "rl.rewards={rank: 1.0, trm: 100.0}", "rl.lr=1.0e-5"],
    # The SASRec baseline's probability: dense (every group informative), so a 10x larger step
    # (docs/rl.md: +9.5% test NDCG@10 on one ML-100K seed).
    "trm@1e-4": [*GRPO, "rl.rewards={trm: 1.0}", "rl.lr=1.0e-4"],
    # The same, with advantages scaled by the batch's reward std instead of each group's: a group
    # where SASRec barely prefers one beam over another then moves the model little.
    "trm-batch@1e-4": [*GRPO, "rl.rewards={trm: 1.0}", "rl.lr=1.0e-4", "rl.scale_rewards=batch"],
    # At 1e-4 valid peaks by step 10 and falls as KL grows: a third of the step, evaluated twice as often.
    "trm@3e-5": [*GRPO, "rl.rewards={trm: 1.0}", "rl.lr=3.0e-5", "rl.eval_every=5"],
    # rank at 1e-5 is still rising at its last step with KL 2e-4: a 5x larger step.
    "rank@5e-5": [*GRPO, "rl.rewards={rank: 1.0}", "rl.lr=5.0e-5", "rl.eval_every=5"],
    # SASRec's log-probability: the KL-regularised optimum is the product ensemble of SFT and SASRec.
    "trm_logp@1e-4": [
        *GRPO,
        TRM_LOGP,
        "rl.lr=1.0e-4",
        "rl.steps=40",
        "rl.eval_every=5",
        "rl.max_minutes=10",
    ],
    "trm_logp@3e-5": [
        *GRPO,
        TRM_LOGP,
        "rl.lr=3.0e-5",
        "rl.steps=60",
        "rl.eval_every=5",
        "rl.max_minutes=12",
    ],
    # The configs' RL until 2026-12-04: trm_logp under the GRPO loss at lr 3e-5 on target prompts
    # (the configs' steps; valid every 5).
    "grpo@3e-5": [TRM_LOGP, *GRPO, "rl.lr=3.0e-5", "rl.eval_every=5"],
    # The same on each user's whole training part as an unlabelled prompt: SASRec never trained on
    # what follows it.
    "histories": [TRM_LOGP, "rl.loss=dapo", "rl.prompts=histories", "rl.lr=3.0e-5", "rl.eval_every=5"],
    # The group's KL-regularised optimum softmax(ref + reward) distilled by one cross-entropy per
    # group (genrec.train.losses.listwise_loss) instead of sampled advantages. A supervised target,
    # not a noisy advantage: at lr 3e-5 its loss barely moved in 20 steps (ML-100K seed 1).
    "listwise@3e-4": [TRM_LOGP, "rl.loss=listwise", "rl.prompts=targets", "rl.lr=3.0e-4", "rl.eval_every=5"],
    # The configs' RL since 2026-12-04 (configs/ml-100k.yaml, configs/beauty.yaml).
    "listwise-histories@3e-4": LISTWISE_HISTORIES,
    # The same for 40 steps: twice ML-100K's 20 (valid was still rising at the last step); Beauty's
    # config already runs 40.
    "listwise-histories@3e-4x2": [*LISTWISE_HISTORIES, "rl.steps=40", "rl.max_minutes=8"],
    # trm_logp@3e-5 in the main job's budget: 20 steps, valid at steps 10 and 20.
    "trm_logp@3e-5x20": [*GRPO, TRM_LOGP, "rl.lr=3.0e-5", "rl.steps=20", "rl.eval_every=10"],
}


def copy_without_rl(src: Path, dst: Path) -> None:
    """``src`` (a finished run directory) to ``dst``, leaving out the rl stage and its work directory."""
    if dst.exists():
        return  # an earlier (maybe killed) run of this variant: the pipeline resumes or skips it
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("rl", ".rl.work", ".*.tmp*"))
    tmp.rename(dst)


def gain_cells(sft: list[float], rl: list[float]) -> str:
    """Relative test NDCG@10 gain of SFT+RL over its own SFT model: mean ± std over seeds, and per seed."""
    gains = [100.0 * (r / s - 1.0) for s, r in zip(sft, rl)]
    spread = np.std(gains, ddof=1) if len(gains) > 1 else 0.0
    return f"{np.mean(gains):+.1f}% ± {spread:.1f} ({', '.join(f'{g:+.1f}%' for g in gains)})"


def dataset_section(
    name, base_dir: Path, variant_dirs: dict[str, Path], seeds, command: str, wall_s: float, cfg
) -> str:
    """The dataset's Markdown section; ``cfg`` is the config the runs were checked against (its rewards, its layout)."""
    from genrec.eval.aggregate import collect, format_summary, summarise
    from genrec.io import read_json

    runs = [base_dir / f"seed_{s}" for s in seeds]
    main = summarise(collect(runs))
    rows = {m: main[m] for m in ("popularity", "sasrec", "sft", "sft+rl") if m in main}
    if "sft+rl" in rows:
        rows["sft+rl (config rewards)"] = rows.pop("sft+rl")
    for variant, vdir in variant_dirs.items():
        got = summarise(collect([vdir / f"seed_{s}" for s in seeds]))
        if "sft+rl" in got:
            rows[f"sft+rl ({variant})"] = got["sft+rl"]
    stats = read_json(runs[0] / "prepare/stats.json")
    # From the config, not a run's config.json: that is rewritten only when a stage runs.
    rewards, items_layout = cfg.rl.rewards, cfg.model.layout == "items"
    lines = [
        f"### {name}: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions\n",
        f"Command: `{command}`; {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; wall {wall_s / 60:.1f} min.\n",
        format_summary(rows, ks=(5, 10, 20)) + "\n",
    ]
    if items_layout:
        lines.append(
            "The config's item layout (`model.layout: items`) ranks the whole catalogue by every item's exact "
            "log-probability (no beam) and has no RL stage.\n"
        )
    else:
        lines.append(
            f"Config rewards: `{rewards}`. RL gain in test NDCG@10 over the same seed's SFT model "
            "(mean ± std over seeds, then per seed):\n"
        )
    sft = rows.get("sft", {}).get("ndcg@10", {}).get("values", [])
    for row, metrics in rows.items():
        if row.startswith("sft+rl") and sft and len(metrics["ndcg@10"]["values"]) == len(sft):
            lines.append(f"- {row}: {gain_cells(sft, metrics['ndcg@10']['values'])}")
    lines.append("")
    sft_runs = [read_json(r / "sft/done.json")["summary"] for r in runs if (r / "sft/done.json").is_file()]
    if sft_runs:
        lines.append(
            "SFT per seed: "
            + "; ".join(
                f"{s['epochs']} epochs (best {s['best_epoch']}, {s.get('stop_reason', 'early stop or budget')}), "
                f"{s['train_seconds'] / 60:.1f} min"
                + (f", {s['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in s else f", layout {s.get('layout')}")
                for s in sft_runs
            )
            + ".\n"
        )
    return "\n".join(lines)


def main() -> int:
    from genrec.config import load_config
    from genrec.eval.aggregate import run_seeds
    from genrec.io import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ml-100k"], choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--rewards", nargs="*", default=[], choices=list(REWARD_VARIANTS), help="RL reward variants")
    ap.add_argument("--base", type=Path, default=ROOT / "bench/out/baselines", help="the baselines' run directories")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/generative")
    ap.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench/results/generative.md",
        help="the table's file (other sections kept)",
    )
    bench_baselines.add_set_option(ap)
    args = ap.parse_args()

    results = args.results
    sections = {}
    for name in args.datasets:
        started = time.time()
        base_dir = args.base / name
        stages = STAGES
        if load_config(ROOT / CONFIGS[name], [f"run_dir={base_dir}", STAGES_NO_RL, *args.set]).model.layout == "items":
            stages = STAGES_NO_RL
            if args.rewards:
                raise SystemExit(f"{CONFIGS[name]} is an item-layout config (model.layout: items): it has no rl stage")
        cfg = load_config(ROOT / CONFIGS[name], [f"run_dir={base_dir}", stages, *args.set])
        run_seeds(cfg, args.seeds)
        variant_dirs = {}
        for variant in args.rewards:
            vdir = args.out / name / f"rl-{variant}"
            for s in args.seeds:
                copy_without_rl(base_dir / f"seed_{s}", vdir / f"seed_{s}")
            overrides = [f"run_dir={vdir}", STAGES, *args.set, *REWARD_VARIANTS[variant]]
            run_seeds(load_config(ROOT / CONFIGS[name], overrides), args.seeds)
            variant_dirs[variant] = vdir
        command = " ".join(["python bench/bench_generative.py --datasets", name, "--seeds", *map(str, args.seeds)])
        if args.rewards:
            command += " --rewards " + " ".join(args.rewards)
        command += bench_baselines.set_flags(args.set)
        if args.results != ap.get_default("results"):
            command += f" --base {args.base} --out {args.out} --results {args.results}"
        sections[name] = dataset_section(name, base_dir, variant_dirs, args.seeds, command, time.time() - started, cfg)
    header = (
        "# The generative recommender: SFT and SFT+RL next to SASRec\n\n"
        "Test split, leave-one-out, full ranking over all items, seen items excluded, trie-constrained beam "
        "search (the item layout: exact scores of every item), mean ± std over the seeds. SASRec and the generative model come from the same run directories. "
        "Each dataset's section gives its command and machine.\n\n"
    )
    # Read now, not at the start: keeps the sections other runs wrote meanwhile.
    sections = {**bench_baselines.previous_sections(results, CONFIGS), **sections}
    atomic_write_text(results, header + "\n".join(sections[n] for n in CONFIGS if n in sections))
    print(results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
