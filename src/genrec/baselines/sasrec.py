"""SASRec (Kang & McAuley, 2018) trained with full-softmax cross-entropy.

The cross-entropy variant over the whole catalogue is the strong one (it beats the
original's sampled BCE by a wide margin on Beauty). Written here rather than taken from
RecBole because genrec needs it as a library object three times over: a baseline, the
DeepRec tool (``encode`` gives the sequence representation) and an RL reward model
(``score`` gives item probabilities), and RecBole's trainer took 74 minutes on this
machine for what this file does in a fraction of it (see docs/baselines.md).

Training is one pass per window: a user's training items ``s_1..s_n`` become the input
``s_1..s_{n-1}`` and the targets ``s_2..s_n``, and causal attention lets every position
learn its next item at once. Logits are computed only at non-padded positions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from genrec.config import SASRecConfig
from genrec.data.dataset import Dataset
from genrec.io import write_json

log = logging.getLogger("genrec")


def causal_encode(encoder: nn.TransformerEncoder, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """x (B, T, H) through ``encoder`` under causal attention with padding keys ``pad`` (B, T) blocked.

    One boolean mask (B * heads, T, T), True = blocked. A padding query may see itself, so no
    row is fully blocked (which would give NaN).
    """
    T = x.shape[1]
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
    blocked = blocked.unsqueeze(0) | pad.unsqueeze(1)  # (B, T, T)
    blocked = blocked & ~torch.eye(T, dtype=torch.bool, device=x.device)
    heads = encoder.layers[0].self_attn.num_heads
    return encoder(x, mask=blocked.repeat_interleave(heads, dim=0))


class SASRec(nn.Module):
    """Item ids are shifted by one inside the model: 0 is padding."""

    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) shifted ids, left-padded with 0 -> hidden states (B, T, H)."""
        B, T = seq.shape
        pos = torch.arange(T, device=seq.device).expand(B, T)
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos)
        x = self.emb_dropout(x)
        return self.final_norm(causal_encode(self.encoder, x, seq == 0))

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> logits over real items (..., N), item_id order."""
        return h @ self.item_emb.weight[1:].T

    def _batch(self, histories: list[np.ndarray]) -> torch.Tensor:
        device = self.item_emb.weight.device
        seq = torch.zeros(len(histories), self.max_len, dtype=torch.long, device=device)
        for b, h in enumerate(histories):
            h = np.asarray(h)[-self.max_len :]
            if len(h):
                seq[b, -len(h) :] = torch.as_tensor(h + 1, device=device)
        return seq

    @torch.no_grad()
    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """The user representation (B, H): the last position's hidden state."""
        return self.forward(self._batch(histories))[:, -1]

    @torch.no_grad()
    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Logits over the catalogue (B, N) for the next item of each history."""
        return self.item_logits(self.encode(histories))

    def checkpoint(self) -> dict:
        """The config and weights that ``from_checkpoint`` rebuilds the model from."""
        cfg = {
            "num_items": self.num_items,
            "max_len": self.max_len,
            "hidden_size": self.item_emb.embedding_dim,
            "num_layers": len(self.encoder.layers),
            "num_heads": self.encoder.layers[0].self_attn.num_heads,
            "dropout": self.emb_dropout.p,
        }
        return {"config": cfg, "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, blob: dict) -> SASRec:
        model = cls(**blob["config"])
        model.load_state_dict(blob["state_dict"])
        return model.eval()

    def save(self, path: str | Path) -> None:
        torch.save(self.checkpoint(), path)

    @classmethod
    def load(cls, path: str | Path) -> SASRec:
        return cls.from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def training_windows(train_seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (W, max_len) of shifted ids, left-padded with 0.

    A sequence of n items gives windows of up to max_len + 1 items, taken from the end with
    stride max_len, so every item after the first is a target exactly once.
    """
    inputs, targets = [], []
    for seq in train_seqs:
        s = np.asarray(seq) + 1
        end = len(s)
        while end >= 2:
            w = s[max(0, end - max_len - 1) : end]
            row_in = np.zeros(max_len, dtype=np.int64)
            row_tg = np.zeros(max_len, dtype=np.int64)
            row_in[max_len - len(w) + 1 :] = w[:-1]
            row_tg[max_len - len(w) + 1 :] = w[1:]
            inputs.append(row_in)
            targets.append(row_tg)
            end -= max_len
    return np.stack(inputs), np.stack(targets)


def train_sasrec(
    dataset: Dataset,
    cfg: SASRecConfig,
    max_history: int,
    seed: int,
    work_dir: Path,
    eval_batch: int = 512,
    build_model: Callable[[], nn.Module] | None = None,
    valid_examples=None,
    name: str = "sasrec",
) -> tuple[SASRec, list[dict]]:
    """Train with early stopping on valid NDCG@10; resumes from ``work_dir/checkpoint.pt`` (``fit_epochs``).

    ``build_model()`` replaces the SASRec built from ``cfg`` by another encoder with its
    interface (``forward``, ``item_logits``, ``score`` and ``max_len``), built under the same seed;
    ``bench/bench_backbone_ids.py`` trains Qwen2 decoders this way. A model with
    ``window_tokens(inputs, targets)`` rewrites the windows into its own tokens (targets shifted
    by one, 0 = no target, as here); one with ``window_loss(h, targets)`` computes its own loss
    from the real positions' states and item ids instead of the cross-entropy over
    ``item_logits`` (``genrec.model.item_layout``). ``valid_examples`` (default: every valid
    user) is what early stopping ranks; ``name`` labels the progress bar and the log.
    """
    from genrec.train.epochs import fit_epochs, valid_ndcg

    torch.manual_seed(seed)
    if build_model is None:
        max_len = cfg.max_len or max_history
        model = SASRec(dataset.num_items, max_len, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dropout)
    else:
        model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inputs, targets = training_windows(dataset.train_sequences(), model.max_len)
    inputs_t, targets_t = torch.as_tensor(inputs), torch.as_tensor(targets)
    if hasattr(model, "window_tokens"):
        inputs_t, targets_t = model.window_tokens(inputs_t, targets_t)
    valid = dataset.examples("valid") if valid_examples is None else valid_examples

    def train_epoch(epoch: int) -> dict:
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the same batches.
        perm = torch.randperm(len(inputs_t), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        total, count = 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            seq, tgt = inputs_t[idx], targets_t[idx]
            h = model(seq)  # (B, T, H)
            keep = tgt > 0
            if hasattr(model, "window_loss"):  # a model with its own output layer (bench_backbone_ids.py)
                loss = model.window_loss(h[keep], tgt[keep] - 1)
            else:
                loss = F.cross_entropy(model.item_logits(h[keep]), tgt[keep] - 1)  # (P, N): real positions only
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * int(keep.sum())
            count += int(keep.sum())
        return {"loss": total / max(count, 1)}

    curves = fit_epochs(
        name, model, opt, train_epoch, lambda: valid_ndcg(model.score, valid, eval_batch), cfg, work_dir
    )
    return model, curves


def run(ctx) -> dict:
    from genrec.eval.evaluate import evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    started = time.time()
    model, curves = train_sasrec(dataset, ctx.cfg.sasrec, ctx.cfg.data.max_history, ctx.seed, ctx.work)
    train_seconds = time.time() - started
    model.save(ctx.out / "model.pt")
    write_json(ctx.out / "curves.json", curves)
    result = evaluate(
        lambda h: model.score(h), dataset, ctx.cfg.eval, ctx.out / "eval", seed=ctx.seed, model_name="sasrec"
    )
    best = max((r.get("valid_ndcg@10", -1) for r in curves), default=-1)
    return {
        "test_ndcg@10": result["test"]["ndcg@10"],
        "test_hr@10": result["test"]["hr@10"],
        "best_valid_ndcg@10": best,
        "epochs": len(curves),
        "train_seconds": round(train_seconds, 1),
    }
