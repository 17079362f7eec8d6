"""Reasoning-mode inference: a free-text rationale first, then trie-constrained SID beam search.

For each history the prompt is ``head(gream_reason) sid(h_1) ... sid(h_k) <think>`` (the prompt
of the ``gream_reason`` task). The model then writes its rationale, greedily or sampled, up
to ``max_think_tokens`` tokens; it stops at the answer marker (``PromptFormat.answer``) or at
eos, and when the budget runs out the answer marker is forced. The rationale (whatever it
holds: malformed text, stray SID tokens) is kept as context, the answer marker appended,
and the SID after it is decoded by ``constrained_beam_search`` on the item trie, so every
answer is an item whatever the rationale said. GREAM itself samples 10 rationales and parses
one SID from each, with a per-level constraint that can produce SIDs of no item; here one
rationale per user is followed by a beam search, which ranks ``k`` distinct items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from genrec.decode.beam import BeamOutput, constrained_beam_search
from genrec.methods.gream.tasks import REASON_TASK, THINK_OPEN, encode_text


@dataclass
class Rationales:
    ids: list[list[int]]  # each row's generated rationale tokens, the stop marker excluded
    forced: np.ndarray  # (B,) bool: the budget ran out before the model wrote the answer marker


def reasoning_prompts(recommender, histories: Sequence[Sequence[int]]) -> list[list[int]]:
    """The ids of each reasoning prompt, ending with the ``<think>`` opener."""
    fmt = recommender.fmt
    if REASON_TASK not in fmt.heads:
        raise ValueError(
            f"this model was not trained with the {REASON_TASK!r} task, so it has no reasoning mode: add "
            f"{REASON_TASK} to sft.tasks (genrec.methods.gream), or use the direct mode"
        )
    head = fmt.head(REASON_TASK) + encode_text(recommender.tokenizer, THINK_OPEN)
    seqrec = len(fmt.head("seqrec"))
    # prompt_ids checks the item ids; past the seqrec head it holds the history's SID ids.
    return [head + recommender.prompt_ids(h)[seqrec:] for h in histories]


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
def generate_rationales(
    model,
    prompts: Sequence[Sequence[int]],
    stop: Sequence[int],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Rationales:
    """Free text after each prompt until the ``stop`` marker (a token sequence), eos, or the budget.

    Greedy when ``temperature`` is 0, else sampled from ``softmax(logits / temperature)``. One
    KV cache for the batch; finished rows are fed padding until every row is done.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch_size = input_ids.shape[0]
    position = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens counted, as decoding does
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True, logits_to_keep=1
    )
    next_pos = position[:, -1] + 1  # (B,)
    stop_t = torch.as_tensor(list(stop), dtype=torch.long, device=device)  # (S,)
    generated = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # (B, u)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)  # (B,)
        generated = torch.cat([generated, token[:, None]], dim=1)
        ends_with_stop = generated.shape[1] >= len(stop_t) and (generated[:, -len(stop_t) :] == stop_t).all(dim=1)
        done = done | (token == eos_id) | ends_with_stop
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos[:, None],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    rows, forced = [], np.zeros(batch_size, dtype=bool)
    stop = list(stop)
    for b, row in enumerate(generated.tolist()):
        cut = _find_end(row, stop, eos_id)
        forced[b] = cut is None
        rows.append(row[:cut] if cut is not None else row)
    return Rationales(rows, forced)


def _find_end(row: list[int], stop: list[int], eos_id: int) -> int | None:
    """Index where the rationale ends (the first eos or stop marker), None when it has neither."""
    for j in range(len(row)):
        if row[j] == eos_id or row[j : j + len(stop)] == stop:
            return j
    return None


def reasoning_recommend(
    recommender,
    histories: Sequence[Sequence[int]],
    k: int = 20,
    max_think_tokens: int = 48,
    num_beams: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[BeamOutput, list[str]]:
    """The top ``k`` items per history after a rationale, and the rationales as text (``<think>`` first).

    ``num_beams`` defaults to ``k``. Every returned item is a real item (trie-constrained),
    whatever the rationale holds; ``rationale`` ends with "[forced]" where the budget ran out.
    """
    num_beams = num_beams or k
    model, fmt, tok = recommender.model, recommender.fmt, recommender.tokenizer
    prompts = reasoning_prompts(recommender, histories)
    was_training = model.training
    model.eval()
    try:
        rationales = generate_rationales(
            model, prompts, fmt.answer, fmt.eos_id, fmt.pad_id, max_think_tokens, temperature, generator
        )
        full = [p + r + list(fmt.answer) for p, r in zip(prompts, rationales.ids)]
        input_ids, attention_mask = left_pad(full, fmt.pad_id, recommender.device)
        out = constrained_beam_search(
            model, input_ids, attention_mask, recommender.trie, recommender.vocab.offsets, num_beams, num_return=k
        )
    finally:
        model.train(was_training)
    think = encode_text(tok, THINK_OPEN)
    texts = [
        tok.decode(think + ids, skip_special_tokens=False) + (" [forced]" if forced else "")
        for ids, forced in zip(rationales.ids, rationales.forced)
    ]
    return out, texts


def reasoning_ranker(recommender, num_beams: int, max_think_tokens: int, temperature: float = 0.0, seed: int = 0):
    """A ranker for ``genrec.eval.evaluate.evaluate``: histories -> (B, num_beams) item ids in reasoning mode."""
    generator = torch.Generator(device=recommender.device).manual_seed(seed) if temperature > 0 else None

    def rank(histories: list[np.ndarray]) -> np.ndarray:
        out, _ = reasoning_recommend(
            recommender,
            [list(map(int, h)) for h in histories],
            num_beams,
            max_think_tokens,
            num_beams,
            temperature,
            generator,
        )
        return out.items.cpu().numpy()

    return rank
