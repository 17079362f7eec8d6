"""How much an RL reward built on SASRec could teach: the SFT model's beams reranked with SASRec.

For every valid and test user of a finished run directory (full ranking, seen items excluded,
as the harness does), the SFT model's 40 trie-constrained beams are reranked by
``beam log-prob + lam * SASRec log-prob``. lam = 0 is the SFT model itself; lam -> inf is
SASRec's order of those beams. Under the KL-regularised RL objective, the optimal policy for
the ``trm_logp`` reward is such a product ensemble (docs/rl.md), so these rows bound what RL
with that reward can reach within the beams.

    python bench/bench_rerank_headroom.py bench/out/baselines/ml-100k/seed_1

Prints NDCG@10 per split and lam (no file is written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from genrec.baselines.sasrec import SASRec
    from genrec.data.dataset import Dataset
    from genrec.eval.evaluate import filter_ranked
    from genrec.eval.metrics import ndcg_at_k, target_ranks
    from genrec.io import read_json
    from genrec.model.recommender import GenerativeRecommender

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory with prepare, sasrec and sft")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default RUN_DIR/sft/model)")
    ap.add_argument("--beams", type=int, default=40)
    ap.add_argument("--lams", type=float, nargs="*", default=[0, 0.25, 0.5, 1, 2, 4, 1e6])
    args = ap.parse_args()

    max_history = read_json(args.run_dir / "config.json")["data"]["max_history"]
    dataset = Dataset.load(args.run_dir / "prepare", max_history)
    recommender = GenerativeRecommender.load(args.model or args.run_dir / "sft" / "model")
    sasrec = SASRec.load(args.run_dir / "sasrec" / "model.pt")
    for split in ("valid", "test"):
        ex = dataset.examples(split)
        ranked = {lam: [] for lam in args.lams}
        for start in range(0, len(ex), 128):
            histories, seen = ex.histories[start : start + 128], ex.seen[start : start + 128]
            with torch.no_grad():
                out = recommender.recommend([list(map(int, h)) for h in histories], args.beams, args.beams)
                trm = torch.log_softmax(sasrec.score(histories), dim=-1).numpy()  # (B, N)
            items, scores = out.items.cpu().numpy(), out.scores.cpu().numpy()  # (B, beams)
            picked = np.take_along_axis(trm, np.clip(items, 0, None), axis=1)
            for lam in args.lams:
                combined = np.where(items >= 0, scores + lam * picked, -np.inf)
                order = np.argsort(-combined, axis=1, kind="stable")
                ranked[lam].append(filter_ranked(np.take_along_axis(items, order, 1), seen, 20, exclude_seen=True))
        for lam in args.lams:
            ndcg = ndcg_at_k(target_ranks(np.concatenate(ranked[lam]), ex.targets), 10)
            print(f"{split}  lam {lam:g}  ndcg@10 {ndcg:.4f}")


if __name__ == "__main__":
    main()
