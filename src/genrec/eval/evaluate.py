"""The one evaluation protocol every model in genrec goes through.

A model is a *ranker*: given a batch of histories it returns either scores over the whole
catalogue ``(B, N)`` (classic models) or ranked candidate item ids ``(B, M)`` (generative
models, from beam search; ``-1`` pads). The harness, not the model, removes already-seen
items when ``eval.exclude_seen`` is set, so the rule is identical for every model in a
table; ties in scores are broken by item id (a stable sort), never by the target.

Outputs, in the directory given:
- ``predictions.parquet``: one row per (split, user): ``split``, ``user_id``, ``target``
  (the held-out item_id), ``ranked`` (the top max(ks) item_ids, best first, -1 pads);
- ``metrics.json``: per split, HR@K and NDCG@K, bootstrap 95% intervals and the user
  count, plus the eval config. ``bench/recompute_metrics.py`` recomputes the metrics from
  the predictions file alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.config import EvalConfig
from genrec.data.dataset import Dataset, Examples
from genrec.eval.metrics import bootstrap_ci, compute_metrics, target_ranks
from genrec.io import write_json

# histories -> scores (B, N) or ranked item ids (B, M). A ranker with the attribute
# ``wants_seen = True`` is called as ranker(histories, seen): every item before each target
# (input-side data, never the target), for models that must not retrieve seen items (DeepRec's
# agent); the harness still applies exclude_seen to its list like every other model's.
Ranker = Callable[..., "np.ndarray | object"]


def topk_from_scores(scores, seen: Sequence[np.ndarray], k: int, exclude_seen: bool) -> np.ndarray:
    """Top-k item ids per row of ``scores`` (B, N), seen items removed when asked; ties by item id."""
    import torch

    if isinstance(scores, torch.Tensor):
        scores = scores.to(torch.float32).clone()
    else:  # a copy: the ranker's array may be read-only (a broadcast view)
        scores = torch.from_numpy(np.array(scores, dtype=np.float32))
    if exclude_seen:
        rows = np.concatenate([np.full(len(s), b) for b, s in enumerate(seen)]) if len(seen) else np.zeros(0)
        cols = np.concatenate(seen) if len(seen) else np.zeros(0)
        if len(cols):
            scores[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = -torch.inf
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.numpy().astype(np.int64)


def filter_ranked(ranked: np.ndarray, seen: Sequence[np.ndarray], k: int, exclude_seen: bool) -> np.ndarray:
    """Keep the first k valid (and, when asked, unseen) ids of each row; pad with -1."""
    ranked = np.asarray(ranked)
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for b, row in enumerate(ranked):
        row = row[row >= 0]
        if exclude_seen and len(seen[b]):
            row = row[~np.isin(row, seen[b])]
        out[b, : min(k, len(row))] = row[:k]
    return out


def rank_examples(ranker: Ranker, examples: Examples, cfg: EvalConfig, num_items: int, desc: str = "") -> np.ndarray:
    """(U, max(ks)) ranked item ids for every example of one split."""
    import torch
    from tqdm import tqdm

    k = max(cfg.ks)
    out = []
    for start in tqdm(
        range(0, len(examples), cfg.batch_size), desc=desc or f"ranking {examples.split}", unit="batch", leave=False
    ):
        sl = slice(start, start + cfg.batch_size)
        hist, seen = examples.histories[sl], examples.seen[sl]
        res = ranker(hist, seen) if getattr(ranker, "wants_seen", False) else ranker(hist)
        res = res.detach().cpu().numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        if res.dtype.kind == "f":
            if res.shape != (len(hist), num_items):
                raise ValueError(f"a ranker returning scores must give shape (batch, {num_items}), got {res.shape}")
            out.append(topk_from_scores(res, seen, k, cfg.exclude_seen))
        else:
            out.append(filter_ranked(res, seen, k, cfg.exclude_seen))
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def evaluate(
    ranker: Ranker,
    dataset: Dataset,
    cfg: EvalConfig,
    out_dir: str | Path,
    splits: Sequence[str] | None = None,
    seed: int = 0,
    model_name: str = "",
) -> dict:
    """Rank every held-out target of ``splits`` (default ``cfg.splits``), write predictions and metrics, return the metrics."""
    splits = cfg.splits if splits is None else splits
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, result = [], {"model": model_name, "eval": asdict(cfg)}
    for split in splits:
        ex = dataset.examples(split)
        # The protocol's guarantee: the target is the true held-out item and never part of the input.
        for s, t in zip(ex.seen, ex.targets):
            if t in s:
                raise ValueError(f"{split}: a held-out target occurs in its own history; de-duplication failed")
        started = time.perf_counter()
        ranked = rank_examples(ranker, ex, cfg, dataset.num_items, desc=f"{model_name} {split}".strip())
        seconds = time.perf_counter() - started
        ranks = target_ranks(ranked, ex.targets)
        result[split] = {
            "users": len(ex),
            **compute_metrics(ranks, cfg.ks),
            "ci95": bootstrap_ci(ranks, cfg.ks, cfg.bootstrap, seed=seed),
            "seconds": round(seconds, 3),
            "ms_per_user": round(1000 * seconds / max(len(ex), 1), 3),
        }
        frames.append(
            pd.DataFrame({"split": split, "user_id": ex.user_ids, "target": ex.targets, "ranked": list(ranked)})
        )
    pd.concat(frames, ignore_index=True).to_parquet(out_dir / "predictions.parquet", index=False)
    write_json(out_dir / "metrics.json", result)
    return result


def format_metrics(rows: dict[str, dict], split: str = "test", ks: Sequence[int] = (5, 10, 20)) -> str:
    """A markdown table: one row per model name -> metrics.json dict."""
    cols = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in rows.items():
        vals = res.get(split, {})
        lines.append(f"| {name} | " + " | ".join(f"{vals.get(c, float('nan')):.4f}" for c in cols) + " |")
    return "\n".join(lines)
