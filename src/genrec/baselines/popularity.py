"""Most-popular baseline: every user gets the items with the most training interactions."""

from __future__ import annotations

import numpy as np

from genrec.data.dataset import Dataset
from genrec.eval.evaluate import evaluate


def popularity_ranker(dataset: Dataset):
    """A ranker scoring each item by its training interaction count (ties broken by item id)."""
    counts = dataset.item_popularity().astype(np.float32)

    def rank(histories: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(counts, (len(histories), len(counts)))

    return rank


def run(ctx) -> dict:
    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    result = evaluate(
        popularity_ranker(dataset), dataset, ctx.cfg.eval, ctx.out / "eval", seed=ctx.seed, model_name="popularity"
    )
    return {"test_ndcg@10": result["test"]["ndcg@10"], "test_hr@10": result["test"]["hr@10"]}
