"""``titles2sid``: the titles of a user's recent training items -> the next item's SID.

``head title(h_1) sep title(h_2) ... sep title(h_k) answer sid(next)``, loss on the SID,
with the last ``text_history`` items before each training target (an item without a
title is named by its text). Every training target of every user is one example, so the
mixing weight is usually well below 1. It links the language side of the model to the
recommendation task (the LC-Rec "fusion" task).
"""

from __future__ import annotations

import numpy as np

from genrec.model.prompt import PromptFormat
from genrec.tasks.base import Example, TaskData


class Titles2SIDTask:
    name = "titles2sid"

    def __init__(self, data: TaskData, fmt: PromptFormat):
        self.data, self.head, self.answer, self.sep = data, fmt.head("titles2sid"), fmt.answer, fmt.sep
        rows = [(u, j) for u, seq in enumerate(data.train_sequences) for j in range(1, len(seq))]
        self.targets = np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # (M, 2): user, position of the target
        name_len = np.asarray([len(n) for n in data.name_ids], dtype=np.int64)
        fixed = len(self.head) + len(self.answer) + data.num_levels
        self.lengths = np.asarray(
            [fixed + self._history_length(name_len, int(u), int(j)) for u, j in self.targets], dtype=np.int64
        )

    def _history(self, user: int, j: int) -> np.ndarray:
        return self.data.train_sequences[user][max(0, j - self.data.text_history) : j]

    def _history_length(self, name_len: np.ndarray, user: int, j: int) -> int:
        hist = self._history(user, j)
        return int(name_len[hist].sum()) + len(self.sep) * (len(hist) - 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Example:
        user, j = (int(v) for v in self.targets[i])
        parts = [self.head]
        for n, item in enumerate(self._history(user, j)):
            parts += [self.sep, self.data.name_ids[item]] if n else [self.data.name_ids[item]]
        sid = self.data.sid_ids[self.data.train_sequences[user][j]]
        ids = np.concatenate([*parts, self.answer, sid]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-len(sid) :] = sid
        return Example(ids, labels, user)


def build(data: TaskData, fmt: PromptFormat) -> Titles2SIDTask:
    return Titles2SIDTask(data, fmt)
