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
from genrec.decode.text import generate_until, left_pad
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

    Greedy when ``temperature`` is 0, else sampled (``genrec.decode.text.generate_until``).
    """
    out = generate_until(model, prompts, [stop], eos_id, pad_id, max_new_tokens, temperature, generator)
    return Rationales(out.ids, np.asarray([s == -2 for s in out.stop], dtype=bool))


def reasoning_recommend(
    recommender,
    histories: Sequence[Sequence[int]],
    k: int = 20,
    max_think_tokens: int = 48,
    num_beams: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
) -> tuple[BeamOutput, list[str]]:
    """The top ``k`` items per history after a rationale, and the rationales as text (``<think>`` first).

    ``num_beams`` defaults to ``k``. Every returned item is a real item (trie-constrained),
    whatever the rationale holds; ``rationale`` ends with "[forced]" where the budget ran out.
    ``stats``, when given, accumulates ``users``, ``forced`` and ``tokens`` (rationale tokens).
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
            model,
            input_ids,
            attention_mask,
            recommender.trie,
            recommender.vocab.offsets,
            num_beams,
            num_return=k,
            sid_softmax=recommender.sid_softmax,
        )
    finally:
        model.train(was_training)
    if stats is not None:
        stats["users"] = stats.get("users", 0) + len(prompts)
        stats["forced"] = stats.get("forced", 0) + int(rationales.forced.sum())
        stats["tokens"] = stats.get("tokens", 0) + sum(len(ids) for ids in rationales.ids)
    think = encode_text(tok, THINK_OPEN)
    texts = [
        tok.decode(think + ids, skip_special_tokens=False) + (" [forced]" if forced else "")
        for ids, forced in zip(rationales.ids, rationales.forced)
    ]
    return out, texts


def reasoning_ranker(recommender, num_beams: int, max_think_tokens: int, temperature: float = 0.0, seed: int = 0):
    """A ranker for ``genrec.eval.evaluate.evaluate``: histories -> (B, num_beams) item ids in reasoning mode.

    ``rank.stats`` counts the rationales it generated: ``users``, ``forced`` (the budget ran out
    before the model wrote the answer marker) and ``tokens`` (their total length).
    """
    generator = torch.Generator(device=recommender.device).manual_seed(seed) if temperature > 0 else None
    stats = {"users": 0, "forced": 0, "tokens": 0}

    def rank(histories: list[np.ndarray]) -> np.ndarray:
        out, _ = reasoning_recommend(
            recommender,
            [list(map(int, h)) for h in histories],
            num_beams,
            max_think_tokens,
            num_beams,
            temperature,
            generator,
            stats,
        )
        return out.items.cpu().numpy()

    rank.stats = stats
    return rank
