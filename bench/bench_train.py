"""SFT training throughput (tokens/s) next to this machine's measured matmul FLOP/s.

The model is genrec's scratch backbone for a config (a Qwen2 with tied embeddings, the
config's ``model.*`` sizes and residual dropout; vocabulary = specials + ``text_vocab_size``
+ the SID tokens of ``sid.levels`` x ``sid.codebook_size`` + the extra level's: 8 dedup
codes, or ``--items`` tokens with ``sid.collision=item``). A step is exactly the SFT
stage's: ``NextTokenLoss`` (LM head on labelled positions only), backward, gradient
clipping, AdamW. Batches are ``seqrec`` windows: ``(max_history + 1) * levels + 2`` tokens,
as many as fit in ``sft.batch_tokens``, loss on every SID token after the first item's.
Token ids are random: the cost of a step does not depend on them.

Model FLOPs per step are counted analytically (fwd + bwd = 3 x fwd):
    fwd = 2 * (non-embedding parameters) * tokens          (the projections and the MLP)
        + 2 * 2 * T * hidden * layers * tokens              (QK^T and AV over the full T x T)
        + 2 * hidden * vocab * labelled tokens              (the LM head)
The matmul rate is the best of ``torch.mm`` on fp32 squares (1024, 2048) and on the
model's own largest shape (batch tokens x hidden @ hidden x intermediate), each run
for about 2 s. Model FLOP/s over that rate is the model's FLOPs utilisation (MFU).

With ``--distill-items N`` it also times the step with ``sft.distill`` in the same run: a
SASRec teacher of the config's ``sasrec.*`` sizes over N items with random SIDs (random
weights: the cost does not depend on them) scores every window's targets, and the KL term
joins the loss (``genrec.train.distill``). The ratio of the two medians is the overhead.

    python bench/bench_train.py --config configs/ml-100k.yaml
    python bench/bench_train.py --config configs/beauty.yaml --items 12101 --distill-items 12101 --out /tmp/train.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from genrec.config import load_config
from genrec.model.backbone import add_residual_dropout
from genrec.train.sft import NextTokenLoss


def matmul_flops(m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of ``torch.mm`` on fp32 (m, k) @ (k, n), best of repeated timings over about ``seconds``."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def build_model(cfg, vocab_size: int):
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.intermediate_size,
        num_hidden_layers=cfg.model.num_layers,
        num_attention_heads=cfg.model.num_heads,
        num_key_value_heads=cfg.model.num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    torch.manual_seed(cfg.seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    add_residual_dropout(model, cfg.model.dropout)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ml-100k.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after 3 warm-up steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--distill-items", type=int, default=0, help="also time sft.distill over this many items")
    p.add_argument("--items", type=int, default=0, help="catalogue size, for sid.collision=item (one token per item)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    m = cfg.model
    if cfg.sid.collision == "item" and not args.items:
        p.error("sid.collision=item needs --items (the catalogue size: its last level has one token per item)")
    levels = cfg.sid.levels + (0 if cfg.sid.collision == "sinkhorn" else 1)
    # The extra level: 8 dedup codes, or one token per item.
    extra = {"dedup": 8, "sinkhorn": 0, "item": args.items}[cfg.sid.collision]
    specials = 5 + len(cfg.sft.tasks)  # <pad> <bos> <eos> <sep> <answer> and one marker per task
    vocab = specials + m.text_vocab_size + cfg.sid.levels * cfg.sid.codebook_size + extra
    length = (cfg.data.max_history + 1) * levels + 2
    rows = max(1, cfg.sft.batch_tokens // length)
    tokens = rows * length
    labelled = rows * cfg.data.max_history * levels

    model = build_model(cfg, vocab)
    loss_module = NextTokenLoss(model, distill_weight=1.0).train()  # plain CE unless a step passes distill
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(specials, vocab, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : 2 + levels] = -100  # <bos><task> and the first item are never targets
    attention_mask = torch.ones_like(input_ids)

    def step(distiller=None) -> None:
        distill = None
        if distiller is not None:  # as genrec.train.sft does it: the teacher's targets, then the loss
            distill = distiller.batch(examples, [rows_labelled] * rows)
        loss = loss_module(input_ids=input_ids, attention_mask=attention_mask, labels=labels, distill=distill)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def median_seconds(distiller=None) -> float:
        for _ in range(3):
            step(distiller)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step(distiller)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    seconds = median_seconds()
    kd_seconds = None
    if args.distill_items:
        from genrec.baselines.sasrec import SASRec
        from genrec.tasks.base import Example
        from genrec.train.distill import SASRecTeacher

        n_items, sizes = (
            args.distill_items,
            [cfg.sid.codebook_size] * cfg.sid.levels + [extra] * (levels - cfg.sid.levels),
        )
        codes = np.stack([np.random.default_rng(level).integers(0, k, n_items) for level, k in enumerate(sizes)], 1)
        s = cfg.sasrec
        sasrec = SASRec(n_items, cfg.data.max_history, s.hidden_size, s.num_layers, s.num_heads, s.dropout)
        distiller = SASRecTeacher(sasrec, codes, codes + specials)
        rows_labelled = cfg.data.max_history * levels
        items = np.random.default_rng(1).integers(0, n_items, (rows, cfg.data.max_history + 1))
        examples = [
            Example(input_ids[r].numpy(), labels[r].numpy(), r, items=items[r], target_from=1) for r in range(rows)
        ]
        kd_seconds = median_seconds(distiller)

    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    fwd = (
        2 * non_embedding * tokens
        + 4 * length * m.hidden_size * m.num_layers * tokens
        + 2 * m.hidden_size * vocab * labelled
    )
    model_flops = 3 * fwd / seconds
    shapes = {
        "1024 x 1024 @ 1024 x 1024": (1024, 1024, 1024),
        "2048 x 2048 @ 2048 x 2048": (2048, 2048, 2048),
        f"{tokens} x {m.hidden_size} @ {m.hidden_size} x {m.intermediate_size} (the MLP's)": (
            tokens,
            m.hidden_size,
            m.intermediate_size,
        ),
    }
    rates = {name: matmul_flops(*shape) for name, shape in shapes.items()}
    peak = max(rates.values())

    setup = (
        f"config `{args.config}`: Qwen2 hidden {m.hidden_size} x {m.num_layers} layers, {m.num_heads} heads "
        f"({m.num_kv_heads} KV), intermediate {m.intermediate_size}, vocab {vocab}, dropout {m.dropout}; "
        f"{non_embedding:,} non-embedding + {embedding:,} embedding parameters; batch {rows} x {length} tokens "
        f"({labelled} labelled); torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}"
    )
    lines = [
        "# SFT training throughput\n",
        setup + "\n",
        "| measure | value |",
        "|---|---|",
        f"| SFT step (median of {args.steps}) | {seconds * 1000:.0f} ms |",
        f"| training tokens/s | {tokens / seconds:,.0f} |",
        f"| model GFLOP/s (analytic, fwd + bwd) | {model_flops / 1e9:.1f} |",
        *[f"| matmul GFLOP/s, {name} | {rate / 1e9:.1f} |" for name, rate in rates.items()],
        f"| model FLOPs utilisation (model / best matmul) | {model_flops / peak:.1%} |",
    ]
    if kd_seconds is not None:
        lines += [
            f"| SFT step with `sft.distill` ({args.distill_items:,} items, median of {args.steps}) | "
            f"{kd_seconds * 1000:.0f} ms |",
            f"| distillation overhead (step time ratio, same run) | {kd_seconds / seconds:.2f}x |",
        ]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + f"\nCommand: `python {shlex.join(sys.argv)}`\n")


if __name__ == "__main__":
    main()
