"""DeepRec's agent mode against the TRM alone and against direct generation, over seeds.

    python bench/bench_deeprec.py [--datasets ml-100k beauty] [--seeds 1 2 3] [--set KEY=VALUE ...]

Runs `configs/deeprec-<dataset>.yaml` (prepare, text, embed, sid, trm, agent_sft, agent_eval,
agent_rl) once per seed into bench/out/deeprec/<dataset>/seed_<s>/, then writes
bench/results/deeprec.md: per row (TRM alone; the warm-up model in direct mode and in agent
mode; the same after RL) HR/NDCG@{5,10,20} and ms per user, mean ± std over the seeds, and
the agent's protocol statistics (calls per user, share of well-formed calls, malformed turns,
users without a call). Rerunning one dataset keeps the others' sections.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_baselines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ml-100k": "configs/deeprec-ml-100k.yaml", "beauty": "configs/deeprec-beauty.yaml"}
PROTOCOL = ("calls_per_user", "well_formed_call_share", "malformed_turns", "users_without_call", "ms_per_user")


def protocol_rows(run_dirs: list[Path]) -> str:
    """The agent's protocol statistics (agent_eval and agent_rl), mean ± std over run directories."""
    from genrec.io import read_json

    lines = ["| model | " + " | ".join(PROTOCOL) + " |", "|---|" + "---|" * len(PROTOCOL)]
    for name, rel in (("deeprec sft (agent)", "agent_eval/agent"), ("deeprec+rl (agent)", "agent_rl/eval/agent")):
        stats = [read_json(d / rel / "protocol.json") for d in run_dirs if (d / rel / "protocol.json").is_file()]
        if not stats:
            continue
        cells = []
        for key in PROTOCOL:
            vals = [float(s[key]) for s in stats if s.get(key) is not None]
            cells.append(f"{np.mean(vals):.3g} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.2g}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    from genrec.config import load_config
    from genrec.eval.aggregate import collect, format_summary, run_seeds, summarise
    from genrec.io import atomic_write_text, read_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ml-100k"], choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/deeprec")
    bench_baselines.add_set_option(ap)
    args = ap.parse_args()

    out = ROOT / "bench/results/deeprec.md"
    sections = {}
    for name in args.datasets:
        run_dir = args.out / name
        cfg = load_config(ROOT / CONFIGS[name], [f"run_dir={run_dir}", *args.set])
        started = time.time()
        run_seeds(cfg, args.seeds)
        wall = time.time() - started
        run_dirs = [run_dir / f"seed_{s}" for s in args.seeds]
        summary = summarise(collect(run_dirs))
        stats = read_json(run_dirs[0] / "prepare/stats.json")
        command = " ".join(["python bench/bench_deeprec.py --datasets", name, "--seeds", *map(str, args.seeds)])
        command += bench_baselines.set_flags(args.set)
        sections[name] = (
            f"### {name}: {stats['users']:,} users, {stats['items']:,} items\n\n"
            f"Command: `{command}`; {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; wall {wall / 60:.1f} min.\n\n"
            f"{format_summary(summary)}\n\n"
            f"ms per user (test): "
            + ", ".join(f"{m} {v['ms_per_user']['mean']:.1f}" for m, v in summary.items() if "ms_per_user" in v)
            + f"\n\nAgent protocol (test and valid users):\n\n{protocol_rows(run_dirs)}\n"
        )
    header = (
        "# DeepRec: agent mode against the TRM alone and direct generation\n\n"
        "Test split, leave-one-out, full ranking, seen items excluded, mean ± std over the seeds. "
        "Each dataset's section gives its command and machine.\n\n"
    )
    # Read now, not at the start: keeps the sections other runs wrote meanwhile.
    sections = {**bench_baselines.previous_sections(out, CONFIGS), **sections}
    atomic_write_text(out, header + "\n".join(sections[n] for n in CONFIGS if n in sections))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
