"""What every SFT task builder reads and returns, and how tasks are mixed into an epoch.

A builder is ``build(data: TaskData, fmt: PromptFormat) -> ExampleSet``: an indexable set of
``Example`` (token ids, labels with -100 where there is no loss, and the user the example
comes from, -1 for item-level tasks). Examples are made on demand from compact index
arrays, so a task with a hundred thousand long examples holds only its indices;
``lengths`` lets the trainer batch by tokens without building them.

Only ``TaskData.train_sequences`` carries interactions: the training part of each user's
sequence (``Dataset.train_sequences()``), so no valid or test item is ever a target or an
input of any task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np


@dataclass
class Example:
    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64: the token to predict at this position, -100 = no loss
    user: int = -1  # the user whose training sequence it comes from; -1 for item-level tasks
    # seqrec: the window's items, whose SIDs from items[target_from] on are exactly the labels
    # (what sft.distill needs to ask SASRec about the same histories); None for other tasks.
    items: np.ndarray | None = None
    target_from: int = 0


class ExampleSet(Protocol):
    """Optionally also ``set_epoch(epoch)``, called before each epoch (curricula); ``lengths``
    must then bound the lengths of every epoch."""

    name: str
    lengths: np.ndarray  # (M,) int64: len(self[i].input_ids)

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Example: ...


class TaskData:
    """The inputs of every task: training sequences, item SID token ids and tokenized item text."""

    def __init__(
        self,
        train_sequences: Sequence[np.ndarray],
        sid_ids: np.ndarray,
        item_texts: Sequence[str],
        titles: Sequence[str],
        tokenizer,
        max_history: int,
        window_stride: int = 0,
        text_history: int = 10,
        max_text_tokens: int = 48,
    ):
        num_items = len(sid_ids)
        if len(item_texts) != num_items or len(titles) != num_items:
            raise ValueError(
                f"{num_items} items have SIDs but there are {len(item_texts)} item texts and {len(titles)} titles"
            )
        self.train_sequences = [np.asarray(s, dtype=np.int64) for s in train_sequences]
        self.sid_ids = np.asarray(sid_ids, dtype=np.int64)  # (N, L)
        self.item_texts, self.titles, self.tokenizer = list(item_texts), list(titles), tokenizer
        self.max_history = max_history
        self.window_stride = window_stride or max_history
        self.text_history, self.max_text_tokens = text_history, max_text_tokens
        if not 1 <= self.window_stride <= max_history:
            raise ValueError(f"window_stride must be in [1, max_history={max_history}], got {window_stride}")

    @property
    def num_items(self) -> int:
        return len(self.sid_ids)

    @property
    def num_levels(self) -> int:
        return self.sid_ids.shape[1]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [np.asarray(row[: self.max_text_tokens], dtype=np.int64) for row in ids]

    @cached_property
    def item_text_ids(self) -> list[np.ndarray]:
        """Each item's composed text, tokenized and cut at max_text_tokens."""
        return self._encode(self.item_texts)

    @cached_property
    def title_ids(self) -> list[np.ndarray]:
        """Each item's title, tokenized and cut at max_text_tokens (empty where the item has none)."""
        return self._encode([t.strip() for t in self.titles])

    @cached_property
    def name_ids(self) -> list[np.ndarray]:
        """How an item is named inside a list of items: its title, or its text when the title is empty."""
        return [title if len(title) else text for title, text in zip(self.title_ids, self.item_text_ids)]


def epoch_examples(sets: Sequence[ExampleSet], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """The examples of one epoch as rows ``(set index, example index)``, (M, 2) int64, unordered.

    Weight ``w`` of a task with ``n`` examples draws ``round(w * n)`` of them: each example
    ``floor(w)`` times, plus a fresh random subset without replacement for the fraction.
    ``w = 1`` is every example once, ``w = 0.25`` a different quarter every epoch. The draw
    depends on (seed, epoch) only, so a resumed run sees the same epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    rows = []
    for s, (examples, weight) in enumerate(zip(sets, weights)):
        n = len(examples)
        whole, frac = divmod(weight, 1.0)
        picks = [np.tile(np.arange(n), int(whole)), rng.choice(n, size=int(round(frac * n)), replace=False)]
        idx = np.concatenate(picks).astype(np.int64)
        rows.append(np.stack([np.full_like(idx, s), idx], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
