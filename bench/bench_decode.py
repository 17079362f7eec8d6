"""Users/s of genrec's trie-constrained beam search against HF ``generate`` on the same model and inputs.

A randomly initialised Qwen2 of the size genrec trains on the CPU (hidden 128, 4 layers,
4 heads, 2 KV heads, intermediate 512) over 2,000 text tokens and 3 x 256 SID tokens;
12,101 items (Amazon Beauty's catalogue size) with random unique 3 x 256 codes, or a run's
real ``sid/codes.npy``; prompts of a user's history (10 to 20 items, 3 SID tokens each)
between a few text tokens, left-padded. Both decoders get the same batches; HF's constraint
is a ``prefix_allowed_tokens_fn`` reading a dict of SID prefixes (the usual way to do it).
Checks that both return the same top-K item set for every user and that every SID we return
is an item, and writes a table to ``bench/results/decode.md``. A third row times HF beam
search without the constraint, to show how much of its cost the constraint is. The decoders
alternate batch by batch, so a change in the machine's load hits all of them alike.

    nice -n 10 python bench/bench_decode.py --threads 1

``--init-std`` (HF's default 0.02) sets the random weights' scale: larger values make the
next-token distributions peaked like a trained model's; the timing does not depend on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from genrec.decode.beam import constrained_beam_search
from genrec.sid.trie import SIDTrie

NUM_TEXT, PAD, EOS = 2000, 0, 1


def make_codes(path: str, num_items: int, codebook: int, levels: int, rng: np.random.Generator) -> np.ndarray:
    if path:
        codes = np.load(path)
        if codes.ndim != 2:
            raise SystemExit(f"{path}: expected codes of shape (num_items, levels), got {codes.shape}")
        return codes.astype(np.int64)
    flat = rng.choice(codebook**levels, size=num_items, replace=False)
    return np.stack([flat // codebook ** (levels - 1 - t) % codebook for t in range(levels)], axis=1)  # (N, L)


def make_prompts(codes: np.ndarray, offsets: np.ndarray, num_users: int, rng: np.random.Generator):
    """Left-padded (U, T) prompts: 4 text tokens, the history's SID tokens, 3 text tokens."""
    rows = []
    for _ in range(num_users):
        history = rng.choice(len(codes), size=int(rng.integers(10, 21)), replace=False)
        sid_tokens = (codes[history] + offsets).reshape(-1)  # (H * L,)
        rows.append(np.concatenate([rng.integers(2, NUM_TEXT, 4), sid_tokens, rng.integers(2, NUM_TEXT, 3)]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((num_users, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((num_users, width), dtype=torch.long)
    for u, r in enumerate(rows):
        input_ids[u, width - len(r) :] = torch.from_numpy(r)
        attention_mask[u, width - len(r) :] = 1
    return input_ids, attention_mask


def batches(input_ids, attention_mask, batch_size):
    for start in range(0, len(input_ids), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        # Trim the columns that are padding in every row of the batch, as a data loader would.
        keep = int(mask.sum(1).max())
        yield ids[:, -keep:], mask[:, -keep:]


def genrec_top_k(model, ids, mask, trie, offsets, num_beams, k):
    out = constrained_beam_search(model, ids, mask, trie, offsets, num_beams=num_beams, num_return=k)
    return out.items, out.scores, out.codes


def hf_top_k(model, ids, mask, trie, offsets, allowed, num_beams, k):
    """HF beam search; ``allowed=None`` drops the constraint, to time generate's own share."""
    width = ids.shape[1]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=num_beams,
        num_return_sequences=k,
        prefix_allowed_tokens_fn=None if allowed is None else lambda _, seq: allowed[tuple(seq[width:].tolist())],
        max_new_tokens=len(offsets),
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        output_scores=True,
    )
    codes = out.sequences[:, width:] - torch.as_tensor(offsets)  # (B*k, L)
    return trie.lookup(codes).view(-1, k), out.sequences_scores.view(-1, k), codes.view(-1, k, len(offsets))


def allowed_tokens(codes: np.ndarray, offsets: list[int]) -> dict[tuple[int, ...], list[int]]:
    """Generated SID token prefix -> the token ids that may follow it, for prefix_allowed_tokens_fn."""
    allowed: dict[tuple[int, ...], set[int]] = {}
    for sid in (codes + np.asarray(offsets)).tolist():
        for t in range(len(offsets)):
            allowed.setdefault(tuple(sid[:t]), set()).add(sid[t])
    return {prefix: sorted(tokens) for prefix, tokens in allowed.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per call, the same for both decoders")
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--k", type=int, default=20, help="items returned per user")
    p.add_argument("--num-items", type=int, default=12101)
    p.add_argument("--codes", default="", help="a run's sid/codes.npy instead of random codes")
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.md"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    codes = make_codes(args.codes, args.num_items, 256, 3, rng)
    sizes = [int(codes[:, t].max()) + 1 for t in range(codes.shape[1])]
    offsets = NUM_TEXT + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    trie = SIDTrie(torch.as_tensor(codes), codebook_sizes=sizes)
    config = transformers.Qwen2Config(
        vocab_size=NUM_TEXT + sum(sizes),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=256,
        initializer_range=args.init_std,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    input_ids, attention_mask = make_prompts(codes, offsets, args.users, rng)
    prompts = list(batches(input_ids, attention_mask, args.batch_size))
    offsets = offsets.tolist()

    allowed = allowed_tokens(codes, offsets)  # built once, outside the timing, like the trie
    decoders = {
        "ours": lambda ids, mask: genrec_top_k(model, ids, mask, trie, offsets, args.num_beams, args.k),
        "hf": lambda ids, mask: hf_top_k(model, ids, mask, trie, offsets, allowed, args.num_beams, args.k),
        "hf_free": lambda ids, mask: hf_top_k(model, ids, mask, trie, offsets, None, args.num_beams, args.k),
    }
    seconds = {name: 0.0 for name in decoders}
    results = {name: [] for name in decoders}
    for decode in decoders.values():
        decode(*prompts[0])  # warm-up
    # Alternate the decoders batch by batch, so that a change in the load of this shared
    # machine hits both alike.
    for ids, mask in prompts:
        for name, decode in decoders.items():
            start = time.perf_counter()
            results[name].append(decode(ids, mask))
            seconds[name] += time.perf_counter() - start
    ours_items, ours_scores, ours_codes = (torch.cat(parts) for parts in zip(*results["ours"]))
    hf_items, hf_scores, _ = (torch.cat(parts) for parts in zip(*results["hf"]))
    ours_s, hf_s, free_s = seconds["ours"], seconds["hf"], seconds["hf_free"]
    valid = trie.lookup(ours_codes.reshape(-1, len(offsets))).view_as(ours_items)
    ours_valid = float(((valid == ours_items) & (ours_items >= 0)).float().mean())

    same_set = np.mean([set(a) == set(b) for a, b in zip(ours_items.tolist(), hf_items.tolist())])
    same_order = np.mean([a == b for a, b in zip(ours_items.tolist(), hf_items.tolist())])
    score_gap = float((ours_scores - hf_scores).abs().max())
    rows = [
        ("genrec constrained_beam_search", ours_s, ours_valid),
        ("HF generate + prefix_allowed_tokens_fn", hf_s, float((hf_items >= 0).float().mean())),
        ("HF generate, unconstrained (its cost without the constraint)", free_s, float("nan")),
    ]
    table = [
        "| decoder | seconds | users/s | valid SIDs | speed-up |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {s:.2f} | {args.users / s:.1f} | {'-' if np.isnan(valid) else f'{valid:.1%}'} | {hf_s / s:.1f}x |"
            for name, s, valid in rows
        ],
    ]
    setup = (
        f"{args.users} users, batch {args.batch_size}, num_beams {args.num_beams}, top {args.k}, "
        f"{len(codes)} items ({'codes ' + args.codes if args.codes else 'random codes'} {'x'.join(map(str, sizes))}), "
        f"prompt length {int(attention_mask.sum(1).min())}-{int(attention_mask.sum(1).max())} tokens, "
        f"Qwen2 hidden 128 x 4 layers, vocab {config.vocab_size}, init std {args.init_std}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    agreement = (
        f"Same top-{args.k} set as HF for {same_set:.1%} of users, same order for {same_order:.1%}; "
        f"largest score difference {score_gap:.2e}."
    )
    text = "\n".join([f"# Constrained decoding benchmark\n\n{setup}\n", *table, "", agreement, ""])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    niceness = os.nice(0)
    under = f" (under `nice -n {niceness}`)" if niceness else ""
    Path(args.out).write_text(text + f"\nCommand: `python {shlex.join(sys.argv)}`{under}\n")


if __name__ == "__main__":
    main()
