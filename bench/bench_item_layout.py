"""The item layout's training step and exact scoring, against the dense per-level softmax it replaced.

The model is ``genrec.model.item_layout.ItemLayoutModel`` at a config's sizes (``model.*``,
``data.max_history``), over a catalogue written as the config writes it with
``sid.collision: item``: ``sid.codebook_size`` groups, then each item's own code. The codes are
random and balanced (the cost does not depend on which items share a group), or a run's
``sid/codes.npy`` with ``--codes``.

- Training step: ``window_loss`` (each state against its node's children only, where a level's
  nodes have few children against its codebook) next to the dense form that the model used
  until 2026-12-07: every level's logits over its whole codebook, the codes that the trie does
  not allow masked. Both run on the same weights and batch of ``sft.batch_size`` windows (half
  padding, as short Beauty histories are), with backward and an Adam step; the losses and
  gradients must agree, so the speed is the only difference.
- Exact scoring: ``score`` over every item for ``--users`` histories, in ms per user.

    python bench/bench_item_layout.py --config configs/beauty.yaml --items 12101
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genrec.config import load_config
from genrec.model.item_layout import ItemLayoutModel


def dense_window_loss(model: ItemLayoutModel, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as the model computed it before 2026-12-07: every code scored, the trie's masked."""
    loss, u = 0.0, h
    for level in range(model.num_levels):
        code = model.codes[targets + 1, level]
        allowed = getattr(model, f"allowed_{level}")[model.nodes[targets, level]]
        logits = model.level_state(u, level) @ model.code_emb[level].weight.T
        loss = loss + F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), code)
        u = u + model.code_emb[level](code)
    return loss


def step_times(model, loss_fn, seq, tgt, steps: int) -> tuple[list[float], float, list[torch.Tensor]]:
    """Median-able step times, the first step's loss and gradients (from the same starting weights)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    times, first_loss, first_grads = [], None, None
    keep = tgt > 0
    for step in range(steps + 2):
        torch.manual_seed(step)  # the same dropout masks for both losses
        start = time.perf_counter()
        h = model(seq)
        loss = loss_fn(h[keep], tgt[keep] - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first_loss is None:
            first_loss = loss.item()
            first_grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
        opt.step()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    model.load_state_dict(state)
    return times, first_loss, first_grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/beauty.yaml")
    p.add_argument("--items", type=int, default=12101, help="catalogue size (ignored with --codes)")
    p.add_argument("--codes", help="a run's sid/codes.npy instead of random balanced codes")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per loss, after 2 warm-up steps")
    p.add_argument("--users", type=int, default=1024, help="histories scored exactly")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/item_layout.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    m, rng = cfg.model, np.random.default_rng(cfg.seed)
    if args.codes:
        codes = np.load(args.codes)
    else:
        codes = np.stack([rng.permutation(args.items) % cfg.sid.codebook_size, np.arange(args.items)], axis=1)
    n, max_len = len(codes), cfg.data.max_history
    torch.manual_seed(cfg.seed)
    model = ItemLayoutModel(
        codes, max_len, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size, m.dropout
    )
    g = torch.Generator().manual_seed(cfg.seed)
    batch = cfg.sft.batch_size
    seq = torch.randint(1, n + 1, (batch, max_len), generator=g)
    tgt = torch.randint(1, n + 1, (batch, max_len), generator=g)
    seq[:, : max_len // 2] = 0
    tgt[:, : max_len // 2] = 0
    model.train()
    new_t, new_loss, new_grads = step_times(model, model.window_loss, seq, tgt, args.steps)
    old_t, old_loss, old_grads = step_times(model, lambda h, t: dense_window_loss(model, h, t), seq, tgt, args.steps)
    max_diff = max(
        (a - b).abs().max().item() for a, b in zip(new_grads, old_grads, strict=True) if a is not None and b is not None
    )
    if abs(new_loss - old_loss) > 1e-4 or max_diff > 1e-5:
        sys.exit(f"the two losses disagree: {new_loss} against {old_loss}, gradients by up to {max_diff}")

    model.eval()
    histories = [rng.integers(0, n, size=rng.integers(1, max_len + 1)) for _ in range(args.users)]
    model.score(histories[:8])  # warm-up
    start = time.perf_counter()
    for s in range(0, len(histories), 256):
        scores = model.score(histories[s : s + 256])
    score_ms = 1000 * (time.perf_counter() - start) / len(histories)
    assert torch.allclose(scores.logsumexp(1), torch.zeros(len(scores)), atol=1e-4)

    new_ms, old_ms = 1000 * statistics.median(new_t), 1000 * statistics.median(old_t)
    groups = len(np.unique(codes[:, 0]))
    lines = [
        "# The item layout: training step and exact scoring",
        "",
        f"config `{args.config}`: Qwen2 hidden {m.hidden_size} x {m.num_layers} layers, {m.num_heads} heads "
        f"({m.num_kv_heads} KV), FFN {m.intermediate_size}, dropout {m.dropout}; {n:,} items in {groups} groups "
        f"({'codes ' + args.codes if args.codes else 'random balanced codes'}); batch {batch} windows x {max_len} "
        f"positions, {int((tgt > 0).sum()):,} targets; torch {torch.__version__} with {args.threads} thread(s), "
        f"{platform.machine()}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| training step, `window_loss` (children only), median of {args.steps} | {new_ms:.0f} ms |",
        f"| training step, dense per-level softmax (before 2026-12-07), median of {args.steps} | {old_ms:.0f} ms |",
        f"| speed-up, same run | {old_ms / new_ms:.2f}x |",
        f"| first-step loss, both | {new_loss:.5f} / {old_loss:.5f} (gradients within {max_diff:.1e}) |",
        f"| exact scoring of all {n:,} items, {args.users} users | {score_ms:.2f} ms per user |",
        "",
        "Command: `" + " ".join(["python", *map(shlex.quote, sys.argv)]) + "`",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
