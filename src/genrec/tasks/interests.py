"""``interest2sid``: a user's mined interests and recent history SIDs -> the next item's SID.

``head interest_1 sep interest_2 ... sep sid(h_1) ... sid(h_k) answer sid(next)``, loss on
the SID, with the user's positively labelled interests (RLDI) in rank order and the last
``max_history`` items before the target.

No leakage: the interests are those the ``rldi`` stage mined from each user's training
prefix (every training item but the last ``rldi.holdout``), and the targets are exactly the
held-out training positions after that prefix, so every interest of a prompt was mined from
items before its target. Valid and test items are never mined, shown or predicted. Users
without a positive prefix interest have no examples.

The builder needs the labelled prefix interests, which ``TaskData`` does not carry: the
``sft`` stage binds them with :func:`interest_task_builder` and passes the result to
``train_sft`` as an extra task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from genrec.model.prompt import PromptFormat
from genrec.tasks.base import Example, TaskData

# Interests shown per prompt, at most.
MAX_INTERESTS = 5


def interest_examples(train_sequences, prefix: pd.DataFrame) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Rows ``(user, target position)`` (M, 2) and each user's positive prefix interests in rank order.

    ``prefix``: rows of ``rldi/prefix_user_interests.parquet`` (user_id, rank, interest, label, prefix_end).

    >>> prefix = pd.DataFrame({"user_id": [0, 0, 1], "rank": [1, 0, 0], "interest": ["b", "a", "c"],
    ...                        "label": [True, True, False], "prefix_end": [3, 3, 2]})
    >>> rows, phrases = interest_examples([np.arange(5), np.arange(4)], prefix)
    >>> rows.tolist(), phrases
    ([[0, 3], [0, 4]], {0: ['a', 'b']})
    """
    positive = prefix[prefix["label"].astype(bool)].sort_values(["user_id", "rank"])
    phrases = {int(u): list(g["interest"])[:MAX_INTERESTS] for u, g in positive.groupby("user_id")}
    ends = prefix.groupby("user_id")["prefix_end"].first().to_dict()
    rows = [
        (u, j)
        for u in sorted(phrases)
        for j in range(max(1, int(ends[u])), len(train_sequences[u]))  # targets after the mined prefix
    ]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2), phrases


class Interest2SIDTask:
    name = "interest2sid"

    def __init__(self, data: TaskData, fmt: PromptFormat, prefix: pd.DataFrame):
        self.data, self.head, self.answer, self.sep = data, fmt.head("interest2sid"), fmt.answer, fmt.sep
        self.targets, phrases = interest_examples(data.train_sequences, prefix)
        # Each user's interests as one id sequence: interest_1 sep interest_2 ... sep.
        self.interest_ids: dict[int, np.ndarray] = {}
        for u, texts in phrases.items():
            parts = [np.concatenate([ids, self.sep]) for ids in data._encode(texts)]
            self.interest_ids[u] = np.concatenate(parts).astype(np.int64)
        fixed = len(self.head) + len(self.answer) + data.num_levels
        self.lengths = np.asarray(
            [
                fixed + len(self.interest_ids[int(u)]) + len(self._history(int(u), int(j))) * data.num_levels
                for u, j in self.targets
            ],
            dtype=np.int64,
        )

    def _history(self, user: int, j: int) -> np.ndarray:
        return self.data.train_sequences[user][max(0, j - self.data.max_history) : j]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Example:
        user, j = (int(v) for v in self.targets[i])
        history = self.data.sid_ids[self._history(user, j)].reshape(-1)
        sid = self.data.sid_ids[self.data.train_sequences[user][j]]
        ids = np.concatenate([self.head, self.interest_ids[user], history, self.answer, sid]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-len(sid) :] = sid
        return Example(ids, labels, user)


def interest_task_builder(prefix: pd.DataFrame) -> Callable[[TaskData, PromptFormat], Interest2SIDTask]:
    """A ``build(data, fmt)`` for ``sft.tasks`` with the labelled prefix interests bound."""

    def build(data: TaskData, fmt: PromptFormat) -> Interest2SIDTask:
        return Interest2SIDTask(data, fmt, prefix)

    return build
