"""``seqrec``: history SIDs -> next SID, learned for every position of a window in one pass.

A window of a user's training items ``i_s .. i_{e-1}`` is the sequence
``head sid(i_s) sid(i_{s+1}) ... sid(i_{e-1})``, the loss is on the SID tokens of the items
from ``loss_from`` on, and causal attention makes the logits at each of those tokens exactly
those of the one-item-at-a-time prompt ``head sid(i_s) ... sid(i_{j-1})`` that
``GenerativeRecommender.prompt_batch`` builds at inference (see docs/sft.md). So one
forward pass trains up to ``max_history`` next-item targets.

Windows are cut from the end of each sequence with stride ``window_stride`` (default
``max_history``): a window holds at most ``max_history + 1`` items and puts its loss on its
last ``stride`` items only, so every training item after a user's first is a target
exactly once, and sees at least ``max_history - stride + 1`` items of history (its full
``min(position, max_history)`` items when stride is 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genrec.model.prompt import PromptFormat
from genrec.tasks.base import Example, TaskData


def seqrec_windows(train_sequences: Sequence[np.ndarray], max_history: int, stride: int) -> np.ndarray:
    """Rows ``(user, start, end, loss_from)``, (W, 4) int64: items ``[start, end)`` in, loss on ``[loss_from, end)``.

    >>> seqrec_windows([np.arange(7)], max_history=3, stride=2).tolist()
    [[0, 3, 7, 5], [0, 1, 5, 3], [0, 0, 3, 1]]
    """
    if not 1 <= stride <= max_history:
        raise ValueError(f"stride must be in [1, max_history={max_history}], got {stride}")
    rows = []
    for user, seq in enumerate(train_sequences):
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_history - 1)
            rows.append((user, start, end, max(end - stride, start + 1)))
            end -= stride
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


class SeqRecTask:
    name = "seqrec"

    def __init__(self, data: TaskData, fmt: PromptFormat):
        self.data, self.head = data, fmt.head("seqrec")
        self.windows = seqrec_windows(data.train_sequences, data.max_history, data.window_stride)
        self.lengths = len(self.head) + (self.windows[:, 2] - self.windows[:, 1]) * data.num_levels

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Example:
        user, start, end, loss_from = (int(v) for v in self.windows[i])
        items = self.data.train_sequences[user][start:end]
        ids = np.concatenate([self.head, self.data.sid_ids[items].reshape(-1)]).astype(np.int64)
        labels = np.full_like(ids, -100)
        first = len(self.head) + (loss_from - start) * self.data.num_levels
        labels[first:] = ids[first:]
        return Example(ids, labels, user, items=items, target_from=int(loss_from - start))


def build(data: TaskData, fmt: PromptFormat) -> SeqRecTask:
    return SeqRecTask(data, fmt)
