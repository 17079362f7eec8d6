"""The ``eval`` stage: the SFT model through the same harness as every baseline.

The token layout ranks by trie-constrained beam search: ``decode.num_beams`` beams
give that many distinct items, best first; the harness then drops seen items (when
``eval.exclude_seen``) and keeps the top max(ks). With exclude_seen, the beams are widened
by the longest history so that dropping seen items can never leave fewer than max(ks).
The item layout (``model.layout: items``) scores every item exactly, so it ranks the whole
catalogue without a beam.
"""

from __future__ import annotations

import numpy as np

from genrec.data.dataset import Dataset
from genrec.eval.evaluate import evaluate


def beam_ranker(recommender, num_beams: int):
    def rank(histories: list[np.ndarray]) -> np.ndarray:
        out = recommender.recommend([list(map(int, h)) for h in histories], num_beams=num_beams, k=num_beams)
        return out.items.cpu().numpy()

    return rank


def num_beams_for(cfg, max_history: int) -> int:
    """Beams needed so that max(ks) unseen items remain after removing up to max_history seen ones."""
    want = max(cfg.eval.ks) + (max_history if cfg.eval.exclude_seen else 0)
    return max(cfg.decode.num_beams, want)


def evaluate_model_dir(ctx, model_dir, out_dir, name: str) -> dict:
    import torch

    from genrec.model import item_layout
    from genrec.model.recommender import GenerativeRecommender

    torch.manual_seed(ctx.seed)
    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    if item_layout.is_item_layout(model_dir):  # every item's exact log-probability: a full ranking, no beam
        model = item_layout.load(model_dir)
        result = evaluate(model.score, dataset, ctx.cfg.eval, out_dir, seed=ctx.seed, model_name=name)
        return {
            "test_ndcg@10": result["test"]["ndcg@10"],
            "test_hr@10": result["test"]["hr@10"],
            "ranking": "exact",
            "ms_per_user": result["test"]["ms_per_user"],
        }
    recommender = GenerativeRecommender.load(model_dir)
    num_beams = num_beams_for(ctx.cfg, ctx.cfg.data.max_history)
    eval_cfg = ctx.cfg.eval
    if eval_cfg.batch_size > ctx.cfg.decode.batch_size:
        from dataclasses import replace

        eval_cfg = replace(eval_cfg, batch_size=ctx.cfg.decode.batch_size)
    result = evaluate(beam_ranker(recommender, num_beams), dataset, eval_cfg, out_dir, seed=ctx.seed, model_name=name)
    return {
        "test_ndcg@10": result["test"]["ndcg@10"],
        "test_hr@10": result["test"]["hr@10"],
        "num_beams": num_beams,
        "ms_per_user": result["test"]["ms_per_user"],
    }


def run(ctx) -> dict:
    return evaluate_model_dir(ctx, ctx.input("sft") / "model", ctx.out, "sft")
