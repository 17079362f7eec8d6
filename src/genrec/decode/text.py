"""Free-text decoding until one of several stop markers: rationales (GREAM) and agent turns (DeepRec).

A stop marker is a token sequence (one id for the scratch tokenizer's special tokens, a few
ids for a pretrained tokenizer's text tags). Decoding is batched with one KV cache; a row
stops at the first stop marker or eos it writes, and finished rows are fed padding until
every row is done or the budget runs out. The caller puts the model in eval mode (or keeps
train mode for RL rollouts, where dropout is the policy's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from genrec.model.backbone import cache_kwargs, output_cache


@dataclass
class Generated:
    ids: list[list[int]]  # each row's generated tokens, the stop marker and eos excluded
    stop: list[int]  # which stop marker ended the row (index into ``stops``), -1 for eos, -2 for the budget
    log_probs: list[list[float]]  # the log-probability of each kept token under the sampling distribution


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T) long, left-padded."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[b, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_until(
    model,
    prompts: Sequence[Sequence[int]],
    stops: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Generated:
    """Text after each prompt until a stop marker of ``stops``, eos, or ``max_new_tokens``.

    Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)``.
    """
    if not prompts:
        return Generated([], [], [])
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch_size = input_ids.shape[0]
    position = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens counted, as decoding does
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True, logits_to_keep=1
    )
    next_pos = position[:, -1] + 1  # (B,)
    stop_t = [torch.as_tensor(list(s), dtype=torch.long, device=device) for s in stops]
    generated = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # (B, u)
    chosen_lp = torch.empty(batch_size, 0, device=device)  # (B, u)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            log_p = torch.log_softmax(logits / temperature, dim=-1)
            token = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(1)
        else:
            log_p = torch.log_softmax(logits, dim=-1)
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)  # (B,)
        generated = torch.cat([generated, token[:, None]], dim=1)
        chosen_lp = torch.cat([chosen_lp, log_p.gather(1, token[:, None])], dim=1)
        ended = token == eos_id
        for s in stop_t:
            if generated.shape[1] >= len(s):
                ended = ended | (generated[:, -len(s) :] == s).all(dim=1)
        done = done | ended
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos[:, None],
            **cache_kwargs(model, output_cache(out)),
            use_cache=True,
        )
        next_pos = next_pos + 1
    stops = [list(s) for s in stops]
    rows, which, lps = [], [], []
    for row, lp in zip(generated.tolist(), chosen_lp.tolist()):
        cut, stop = find_end(row, stops, eos_id)
        rows.append(row[:cut])
        which.append(stop)
        lps.append(lp[:cut])
    return Generated(rows, which, lps)


def find_end(row: list[int], stops: list[list[int]], eos_id: int) -> tuple[int, int]:
    """(where the text ends, which stop ended it): the first eos (-1) or stop marker; (len, -2) when none.

    >>> find_end([5, 6, 9, 7], [[9], [6, 7]], eos_id=2)
    (2, 0)
    >>> find_end([5, 2, 9], [[9]], eos_id=2), find_end([5, 5], [[9]], eos_id=2)
    ((1, -1), (2, -2))
    """
    for j in range(len(row)):
        if row[j] == eos_id:
            return j, -1
        for s, stop in enumerate(stops):
            if row[j : j + len(stop)] == stop:
                return j, s
    return len(row), -2
