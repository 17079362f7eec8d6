"""SFT of the item layout (``model.layout: items``, genrec.model.item_layout).

The model reads one position per item and generates the next item's SID with its depth head, so
a training window is SASRec's: a user's training items ``s_1..s_n`` in, ``s_2..s_n`` out, every
position learning its next item at once (``ItemLayoutModel.window_loss``, the teacher-forced NLL of
the target's SID). It trains through SASRec's own loop (``genrec.baselines.sasrec.train_sasrec``):
Adam at ``sft.lr`` (``sft.weight_decay`` as Adam's L2 term), cut by ``sft.lr_drop_factor`` from
the best weights at each of the first ``sft.lr_drops`` plateaus, ``sft.batch_size`` windows a
batch, early stopping on ``sft.eval_users`` valid users (0 = all) every ``sft.eval_every`` epochs,
a checkpoint after every epoch that a killed run resumes from. On Beauty that regimen (dropout
0.5, 2 layers of 64) is the one that carried a Qwen2 block on item ids to SASRec's level
(docs/sft.md). It runs in one process: the token layout's ``accelerate`` path (DDP, mixed
precision) is not wired here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from genrec.config import RunConfig, SASRecConfig
from genrec.data.dataset import Dataset
from genrec.io import write_json


def train_items(
    cfg: RunConfig, dataset: Dataset, codes: np.ndarray, out_dir: Path, work_dir: Path, sasrec=None
) -> dict:
    """Train, keep the best valid epoch, write ``model/``, ``curves.jsonl`` and ``train_summary.json``."""
    import torch

    from genrec.baselines.sasrec import train_sasrec
    from genrec.model.backbone import count_parameters
    from genrec.model.item_layout import ItemLayoutModel, save
    from genrec.train.sft import _valid_sample, _write_curves

    m, sft, max_len = cfg.model, cfg.sft, cfg.data.max_history
    regimen = SASRecConfig(
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        dropout=m.dropout,
        max_len=max_len,
        lr=sft.lr,
        weight_decay=sft.weight_decay,
        batch_size=sft.batch_size,
        max_epochs=sft.max_epochs,
        patience=sft.patience,
        eval_every=sft.eval_every,
        max_minutes=sft.max_minutes,
        lr_drops=sft.lr_drops,
        lr_drop_factor=sft.lr_drop_factor,
    )
    vectors = None
    if m.item_embedding == "sasrec":  # the run's SASRec item table, frozen; row 0 is its padding
        vectors = sasrec.item_emb.weight[1:].detach().cpu()

    def build() -> ItemLayoutModel:
        return ItemLayoutModel(
            codes,
            max_len,
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.num_kv_heads,
            m.intermediate_size,
            m.dropout,
            item_vectors=vectors,
        )

    valid = _valid_sample(dataset, sft.eval_users, cfg.seed)
    started = time.time()
    model, curves = train_sasrec(
        dataset,
        regimen,
        max_len,
        cfg.seed,
        work_dir,
        eval_batch=256,
        build_model=build,
        valid_examples=valid,
        name="sft",
    )
    seconds = time.time() - started
    best = max(curves, key=lambda r: r.get("valid_ndcg@10", -1.0), default={})
    if len(curves) >= sft.max_epochs:
        stop = "max_epochs"
    elif sft.max_minutes and seconds > 60 * sft.max_minutes:
        stop = "max_minutes"
    else:
        stop = "early_stop"
    summary = {
        "layout": "items",
        "best_valid_ndcg@10": best.get("valid_ndcg@10", -1.0),
        "best_epoch": best.get("epoch", -1),
        "epochs": len(curves),
        "stop_reason": stop,
        "train_seconds": round(seconds, 1),
        "params": count_parameters(model),
        "valid_users": len(valid),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save(model, out_dir / "model", max_len)
    _write_curves(out_dir / "curves.jsonl", curves)
    write_json(out_dir / "train_summary.json", summary)
    return summary
