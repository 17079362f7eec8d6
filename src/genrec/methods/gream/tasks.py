"""GREAM's SFT tasks: ``co2sid`` (collaborative alignment) and ``gream_reason`` (reasoning chains).

``co2sid``: ``head sid(i) answer sid(j_1) ... sid(j_m) eos``, loss on the output: the ``co_items``
items most often within ``co_window`` positions of item ``i`` in the training sequences (either
direction; ties by item id). It ties each SID to collaborative signal, beside ``item2sid``
(text) and ``titles2sid`` (a title history -> the next SID, the other alignment task the
issue names, already in ``genrec.tasks``).

``gream_reason``: the prompt is ``head sid(h_1) ... sid(h_k) <think>`` (the reasoning-mode
inference prompt, ``genrec.methods.gream.reasoning``), and the chain that follows is
``evidence preferences intent </think> rewrite: sid(r_1) ... sid(r_m) answer sid(target) eos``.
The curriculum (``gream.curriculum_epochs`` = E > 0) walks through five stages, stage
``min(5, 1 + 5 e // E)`` at epoch ``e``; stage s trains the prefix of the chain that its
skill needs, with the loss on all of it:

1. evidence extraction: ``evidence``;
2. latent preference modelling: ``evidence preferences``;
3. intent inference: ``evidence preferences intent``;
4. recommendation formulation: ``evidence preferences intent </think> answer sid eos``;
5. denoised sequence rewriting: the whole chain, rewrite included.

``train_sft`` calls ``set_epoch`` on every task set before each epoch. ``lengths`` are those of
full chains, an upper bound for every stage, so batches stay within ``sft.batch_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genrec.methods.gream.chains import Chain
from genrec.methods.gream.config import GREAMConfig
from genrec.model.prompt import INSTRUCTIONS, PromptFormat
from genrec.tasks.base import Example, TaskData

REASON_TASK = "gream_reason"
CO_TASK = "co2sid"
NUM_STAGES = 5
THINK_OPEN, THINK_CLOSE, REWRITE = "<think>", " </think>", " rewrite:"

# Heads for pretrained backbones (genrec.model.prompt: a task registered later adds its instruction).
INSTRUCTIONS.setdefault(
    REASON_TASK,
    "Here is the history of items a user interacted with, in order. Reason about the user, rewrite the history "
    "without the items that do not fit, and recommend the next item:",
)
INSTRUCTIONS.setdefault(CO_TASK, "Which items are often interacted with together with this item?")


def curriculum_stage(epoch: int, curriculum_epochs: int) -> int:
    """The stage (1..5) of 0-based ``epoch``; 5 (full chains) throughout when curriculum_epochs is 0.

    >>> [curriculum_stage(e, 10) for e in range(12)]
    [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5]
    """
    if curriculum_epochs == 0:
        return NUM_STAGES
    return min(NUM_STAGES, 1 + NUM_STAGES * epoch // curriculum_epochs)


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def co_interactions(train_sequences: Sequence[np.ndarray], num_items: int, window: int, top: int) -> list[np.ndarray]:
    """For each item, its ``top`` most frequent partners within ``window`` positions (counts desc, then id).

    >>> [p.tolist() for p in co_interactions([np.array([0, 1, 2]), np.array([1, 2])], 4, 1, 2)]
    [[1], [2, 0], [1], []]
    """
    firsts, seconds = [], []
    for seq in train_sequences:
        for d in range(1, window + 1):
            firsts += [seq[:-d], seq[d:]]
            seconds += [seq[d:], seq[:-d]]
    if not firsts:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_items)]
    a, b = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    pairs, counts = np.unique(a * num_items + b, return_counts=True)
    src, dst = pairs // num_items, pairs % num_items
    # Sort by (item, -count, partner): each item's partners come out best first.
    order = np.lexsort((dst, -counts, src))
    src, dst = src[order], dst[order]
    starts = np.searchsorted(src, np.arange(num_items + 1))
    return [dst[starts[i] : min(starts[i + 1], starts[i] + top)] for i in range(num_items)]


class CoSIDTask:
    name = CO_TASK

    def __init__(self, data: TaskData, fmt: PromptFormat, cfg: GREAMConfig):
        self.data, self.head, self.answer, self.eos = data, fmt.head(CO_TASK), fmt.answer, fmt.eos_id
        partners = co_interactions(data.train_sequences, data.num_items, cfg.co_window, cfg.co_items)
        self.items = np.asarray([i for i, p in enumerate(partners) if len(p)], dtype=np.int64)
        self.partners = [partners[i] for i in self.items]
        fixed = len(self.head) + data.num_levels + len(self.answer) + 1
        self.lengths = np.asarray([fixed + len(p) * data.num_levels for p in self.partners], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        sid = self.data.sid_ids
        output = np.concatenate([sid[self.partners[i]].reshape(-1), [self.eos]])
        ids = np.concatenate([self.head, sid[self.items[i]], self.answer, output]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-len(output) :] = output
        return Example(ids, labels)


class ReasonTask:
    """One example per chain; ``set_epoch`` picks the curriculum stage (see the module docstring)."""

    name = REASON_TASK

    def __init__(self, data: TaskData, fmt: PromptFormat, chains: Sequence[Chain], curriculum_epochs: int):
        self.data, self.chains, self.curriculum_epochs = data, list(chains), curriculum_epochs
        self.stage = curriculum_stage(0, curriculum_epochs)
        tok, cap = data.tokenizer, data.max_text_tokens
        self.head = np.asarray(fmt.head(REASON_TASK) + encode_text(tok, THINK_OPEN), dtype=np.int64)
        self.close = np.asarray(encode_text(tok, THINK_CLOSE), dtype=np.int64)
        self.rewrite_head = np.asarray(encode_text(tok, REWRITE), dtype=np.int64)
        self.answer, self.eos = np.asarray(fmt.answer, dtype=np.int64), fmt.eos_id
        texts = [" " + getattr(c, step) for c in self.chains for step in ("evidence", "preferences", "intent")]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        # (M, 3) token ids of each chain's three steps, each cut at max_text_tokens.
        self.steps = [
            [np.asarray(row[:cap], dtype=np.int64) for row in ids[3 * m : 3 * m + 3]] for m in range(len(self.chains))
        ]
        self.lengths = np.asarray([len(self._ids(m, NUM_STAGES)[0]) for m in range(len(self.chains))], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.stage = curriculum_stage(epoch, self.curriculum_epochs)

    def prompt(self, chain: Chain) -> np.ndarray:
        return np.concatenate([self.head, self.data.sid_ids[chain.history].reshape(-1)])

    def _ids(self, m: int, stage: int) -> tuple[np.ndarray, int]:
        """(the example's ids, where its loss starts) for chain ``m`` at curriculum ``stage``."""
        chain, sid = self.chains[m], self.data.sid_ids
        prompt = self.prompt(chain)
        parts = [prompt, *self.steps[m][: min(stage, 3)]]
        if stage >= 4:
            parts.append(self.close)
            if stage >= 5:
                parts += [self.rewrite_head, sid[chain.rewrite].reshape(-1)]
            parts += [self.answer, sid[chain.target], [self.eos]]
        return np.concatenate(parts).astype(np.int64), len(prompt)

    def __len__(self) -> int:
        return len(self.chains)

    def __getitem__(self, i: int) -> Example:
        ids, start = self._ids(i, self.stage)
        labels = np.full_like(ids, -100)
        labels[start:] = ids[start:]
        return Example(ids, labels, self.chains[i].user)


def gream_builders(cfg: GREAMConfig, chains: Sequence[Chain]) -> dict:
    """Task builders for ``train_sft(..., extra_tasks=...)``: name -> ``build(data, fmt)``."""
    return {
        CO_TASK: lambda data, fmt: CoSIDTask(data, fmt, cfg),
        REASON_TASK: lambda data, fmt: ReasonTask(data, fmt, chains, cfg.curriculum_epochs),
    }
