"""Where the generative model loses to SASRec: at the first SID level, or inside the first-level group.

For a sample of test users of a finished run directory, both models' probability of the
target is split along the SID's first level:

- level 1: the generative model's log P(c1 | history) (its first token, full-vocabulary
  softmax) against SASRec's probability mass on the items whose first code is c1 (logsumexp
  of its item log-softmax over them);
- inside the group: the target's log-probability among the items that share its first code,
  renormalised over that group, for the generative model (the rest of the SID, teacher-forced
  by ``score_candidates``) and for SASRec.

Ranks count how many codes (or group members) score above the target. These are the models'
own probabilities over the whole catalogue: seen items are not removed, as they are in the
harness's rankings.

    python bench/bench_level_breakdown.py bench/out/baselines/beauty/seed_1 --users 2000

Prints mean NLLs and top-k shares per model (no file is written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from genrec.baselines.sasrec import SASRec
    from genrec.data.dataset import Dataset
    from genrec.decode.beam import _PromptTree, score_candidates
    from genrec.io import read_json
    from genrec.model.recommender import GenerativeRecommender, _eval_mode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory with prepare, sasrec and sft")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default RUN_DIR/sft/model)")
    ap.add_argument("--users", type=int, default=2000, help="test users sampled (seed 0)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    max_history = read_json(args.run_dir / "config.json")["data"]["max_history"]
    dataset = Dataset.load(args.run_dir / "prepare", max_history)
    rec = GenerativeRecommender.load(args.model or args.run_dir / "sft" / "model")
    sasrec = SASRec.load(args.run_dir / "sasrec" / "model.pt")
    ex = dataset.examples("test")
    pick = np.random.default_rng(0).choice(len(ex.targets), min(args.users, len(ex.targets)), replace=False)
    first = rec.codes[:, 0]
    size, offset = rec.vocab.codebook_sizes[0], rec.vocab.offsets[0]
    groups = [np.flatnonzero(first == c) for c in range(size)]
    members = np.eye(size)[first]  # (N, K) one-hot: which group each item is in
    width = max(len(g) for g in groups)
    gen = {"nll1": [], "rank1": [], "nll2": [], "rank2": []}
    trm = {"nll1": [], "rank1": [], "nll2": [], "rank2": []}
    for start in range(0, len(pick), args.batch_size):
        rows = pick[start : start + args.batch_size]
        histories, targets = [ex.histories[i] for i in rows], ex.targets[rows]
        input_ids, attention_mask = rec.prompt_batch([list(map(int, h)) for h in histories])
        cand = np.full((len(rows), width, rec.codes.shape[1]), -1, dtype=np.int64)
        for b, t in enumerate(targets):
            cand[b, : len(groups[first[t]])] = rec.sid_ids[groups[first[t]]]
        with torch.no_grad(), _eval_mode(rec.model):
            logits = _PromptTree(rec.model, input_ids, attention_mask, 1).prompt_logits  # as the beam search reads it
            level1 = (logits[:, offset : offset + size] - torch.logsumexp(logits, 1, keepdim=True)).numpy()
            inside = score_candidates(rec.model, input_ids, attention_mask, torch.as_tensor(cand)).numpy()
            item_logp = torch.log_softmax(sasrec.score(histories), dim=-1).double().numpy()  # (B, N)
        # SASRec's log P(c1) for every group: logsumexp of its items' log-probs, as one product.
        top = item_logp.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            masses = np.log(np.exp(item_logp - top) @ members) + top  # (B, K)
        for b, t in enumerate(targets):
            group = groups[first[t]]
            at = int(np.flatnonzero(group == t)[0])
            for out, l1, l2 in ((gen, level1[b], inside[b, : len(group)]), (trm, masses[b], item_logp[b, group])):
                out["nll1"].append(-(l1[first[t]] - np.logaddexp.reduce(l1)))
                out["rank1"].append(int((l1 > l1[first[t]]).sum()))
                out["nll2"].append(-(l2[at] - np.logaddexp.reduce(l2)))
                out["rank2"].append(int((l2 > l2[at]).sum()))

    print(
        f"{args.run_dir}: {len(pick)} test users, {size} first-level groups of {np.mean([len(g) for g in groups]):.1f} items"
    )
    print(f"{'':28} {'generative':>10} {'SASRec':>10}")
    for key, name in (("nll1", "level-1 NLL"), ("nll2", "inside-group NLL")):
        print(f"{name:28} {np.mean(gen[key]):10.3f} {np.mean(trm[key]):10.3f}")
    for k in (1, 5, 10, 20):
        print(
            f"{f'first code in top {k}':28} {np.mean(np.array(gen['rank1']) < k):10.3f} {np.mean(np.array(trm['rank1']) < k):10.3f}"
        )
    for k in (1, 5, 10):
        print(
            f"{f'item in top {k} of its group':28} {np.mean(np.array(gen['rank2']) < k):10.3f} {np.mean(np.array(trm['rank2']) < k):10.3f}"
        )


if __name__ == "__main__":
    main()
