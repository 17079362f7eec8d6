"""Exact full-catalogue ranking of a 2-token SID model, and its product with SASRec.

For a generative model whose SIDs are two tokens (``sid.levels=1`` with ``sid.collision=item``:
a first-level group, then the item's own token), every item's log-probability is exact and
cheap: one prompt pass gives log P(group) for all groups, and one step of all groups as
continuations (``_PromptTree``, the beam search's own KV-cache tree) gives log P(item | group)
for every item, renormalised over its group's items as the constrained decoder does. This
script ranks the whole catalogue by

    log P_gen(item) + lam * log P_SASRec(item)        for each lam in --lams

with the harness's own pieces (``topk_from_scores``: seen items removed, ties by item id;
``target_ranks``, ``ndcg_at_k``, ``hit_rate_at_k``), over every user of the split. lam 0 is the generative model alone and must equal the ``eval`` stage's
beam search when the beams cover the model's top items; ``sasrec`` is SASRec alone. With
``--control RUN_DIR2`` it also scores the product of this run's SASRec with another run's SASRec
(another seed), the ensemble that any two models get for free.

    python bench/bench_exact_product.py bench/out/explore/item1d3_s1 --split test \\
        --control bench/out/baselines/beauty/seed_2

Prints NDCG@10 and HR@10 per scorer and writes them to --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch
    from tqdm import tqdm

    from genrec.baselines.sasrec import SASRec
    from genrec.data.dataset import Dataset
    from genrec.decode.beam import _PromptTree
    from genrec.eval.evaluate import topk_from_scores
    from genrec.eval.metrics import hit_rate_at_k, ndcg_at_k, target_ranks
    from genrec.io import read_json
    from genrec.model.recommender import GenerativeRecommender, _eval_mode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory with prepare, sasrec and a 2-token sft model")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default RUN_DIR/sft/model)")
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--control", type=Path, default=None, help="another run directory whose SASRec joins this one's")
    ap.add_argument("--limit", type=int, default=None, help="only the first N users of the split (a quick check)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    max_history = read_json(args.run_dir / "config.json")["data"]["max_history"]
    ex = Dataset.load(args.run_dir / "prepare", max_history).examples(args.split)
    total = len(ex.targets) if args.limit is None else min(args.limit, len(ex.targets))
    rec = GenerativeRecommender.load(args.model or args.run_dir / "sft" / "model")
    sasrec = SASRec.load(args.run_dir / "sasrec" / "model.pt")
    other = SASRec.load(args.control / "sasrec" / "model.pt") if args.control else None
    num_items, num_levels = rec.codes.shape
    if num_levels != 2 or not np.array_equal(rec.codes[:, 1], np.arange(num_items)):
        raise SystemExit(
            f"{args.run_dir}: exact scoring here needs 2-token SIDs whose second code is the item id "
            f"(sid.levels=1, sid.collision=item); this model has {num_levels} levels"
        )
    size, (off1, off2) = rec.vocab.codebook_sizes[0], rec.vocab.offsets[:2]
    group = torch.as_tensor(rec.codes[:, 0])
    members = torch.eye(size, dtype=torch.float64)[group]  # (N, K)
    names = [f"lam {lam:g}" for lam in args.lams] + ["sasrec"] + (["sasrec x sasrec(control)"] if other else [])
    ranked = {name: [] for name in names}
    start = time.perf_counter()
    for lo in tqdm(range(0, total, args.batch_size), desc="users", unit="batch"):
        rows = range(lo, min(total, lo + args.batch_size))
        histories, seen = [ex.histories[i] for i in rows], [ex.seen[i] for i in rows]
        input_ids, attention_mask = rec.prompt_batch([list(map(int, h)) for h in histories])
        with torch.no_grad(), _eval_mode(rec.model):
            tree = _PromptTree(rec.model, input_ids, attention_mask, size)
            level1 = torch.log_softmax(tree.prompt_logits[:, off1 : off1 + size].double(), dim=1)  # (B, K)
            logits = tree.step(torch.arange(size).expand(len(rows), size) + off1).reshape(len(rows), size, -1)
            level2 = logits[:, group, off2 + torch.arange(num_items)].double()  # (B, N): each item under its group
            top = level2.max(dim=1, keepdim=True).values
            norm = torch.log(torch.exp(level2 - top) @ members) + top  # (B, K) logsumexp over each group
            gen = level1[:, group] + level2 - norm[:, group]
            trm = torch.log_softmax(sasrec.score(histories).double(), dim=-1)
            ctl = torch.log_softmax(other.score(histories).double(), dim=-1) if other else None
        scorers = [gen + lam * trm for lam in args.lams] + [trm] + ([trm + ctl] if other else [])
        for name, scores in zip(names, scorers):
            ranked[name].append(topk_from_scores(scores, seen, 10, exclude_seen=True))
    ranks = {name: target_ranks(np.concatenate(r), ex.targets[:total]) for name, r in ranked.items()}
    result = {name: {"ndcg@10": ndcg_at_k(r, 10), "hr@10": hit_rate_at_k(r, 10)} for name, r in ranks.items()}
    print(f"{args.run_dir} {args.split}: {total} users, {time.perf_counter() - start:.0f} s")
    for name, m in result.items():
        print(f"  {name:28} NDCG@10 {m['ndcg@10']:.4f}  HR@10 {m['hr@10']:.4f}")
    if args.out:
        args.out.write_text(
            json.dumps({"run_dir": str(args.run_dir), "split": args.split, "users": total, **result}, indent=1)
        )


if __name__ == "__main__":
    main()
