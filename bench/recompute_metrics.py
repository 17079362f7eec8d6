"""Recompute HR@K / NDCG@K from a predictions file alone and compare with metrics.json.

Independent of genrec's metric code on purpose (only pandas and math), so it checks the
harness rather than repeating it. It also checks that every target is the user's true
held-out item, read from the prepared sequences.

    python bench/recompute_metrics.py RUN_DIR/sasrec/eval [--dataset RUN_DIR/prepare]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd


def recompute(pred_path: Path, ks: list[int]) -> dict[str, dict[str, float]]:
    preds = pd.read_parquet(pred_path)
    out: dict[str, dict[str, float]] = {}
    for split, part in preds.groupby("split"):
        hits = {k: 0.0 for k in ks}
        gains = {k: 0.0 for k in ks}
        for target, ranked in zip(part["target"], part["ranked"]):
            ranked = list(ranked)
            if target in ranked:
                r = ranked.index(target)
                for k in ks:
                    if r < k:
                        hits[k] += 1
                        gains[k] += 1 / math.log2(r + 2)
        n = len(part)
        out[split] = {**{f"hr@{k}": hits[k] / n for k in ks}, **{f"ndcg@{k}": gains[k] / n for k in ks}}
    return out


def check_targets(pred_path: Path, dataset_dir: Path) -> int:
    preds = pd.read_parquet(pred_path)
    seqs = pd.read_parquet(dataset_dir / "sequences.parquet").set_index("user_id")
    bad = 0
    for split, user, target in zip(preds["split"], preds["user_id"], preds["target"]):
        row = seqs.loc[user]
        pos = row["valid_pos"] if split == "valid" else row["test_pos"]
        bad += int(row["item_ids"][pos] != target)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a directory with predictions.parquet and metrics.json")
    ap.add_argument("--dataset", type=Path, help="the run's prepare/ directory, to check the targets")
    args = ap.parse_args()
    reported = json.loads((args.eval_dir / "metrics.json").read_text())
    ks = reported["eval"]["ks"]
    mine = recompute(args.eval_dir / "predictions.parquet", ks)
    worst = 0.0
    for split, vals in mine.items():
        for key, val in vals.items():
            diff = abs(val - reported[split][key])
            worst = max(worst, diff)
            print(f"{split:5} {key:8} recomputed {val:.6f} reported {reported[split][key]:.6f}")
    ok = worst < 1e-9
    if args.dataset:
        bad = check_targets(args.eval_dir / "predictions.parquet", args.dataset)
        print(f"targets that are not the user's held-out item: {bad}")
        ok = ok and bad == 0
    print("OK: predictions reproduce metrics.json" if ok else f"MISMATCH (max difference {worst})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
