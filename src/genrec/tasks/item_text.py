"""Item text <-> SID alignment: ``item2sid`` (item text -> SID) and ``sid2title`` (SID -> title).

``item2sid``: ``head text(i) answer sid(i)``, loss on the SID; teaches which text each SID
stands for, so items with few interactions still get meaningful SID embeddings.
``sid2title``: ``head sid(i) answer title(i) eos``, loss on the title and eos; items without
a title are left out. One example per item; the mixing weight sets how many per epoch.
"""

from __future__ import annotations

import numpy as np

from genrec.model.prompt import PromptFormat
from genrec.tasks.base import Example, TaskData


class Item2SIDTask:
    name = "item2sid"

    def __init__(self, data: TaskData, fmt: PromptFormat):
        self.data, self.head, self.answer = data, fmt.head("item2sid"), fmt.answer
        texts = data.item_text_ids
        self.lengths = np.asarray([len(self.head) + len(t) + len(self.answer) + data.num_levels for t in texts])

    def __len__(self) -> int:
        return self.data.num_items

    def __getitem__(self, i: int) -> Example:
        sid = self.data.sid_ids[i]
        ids = np.concatenate([self.head, self.data.item_text_ids[i], self.answer, sid]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-len(sid) :] = sid
        return Example(ids, labels)


class SID2TitleTask:
    name = "sid2title"

    def __init__(self, data: TaskData, fmt: PromptFormat):
        self.data, self.head, self.answer, self.eos = data, fmt.head("sid2title"), fmt.answer, fmt.eos_id
        self.items = np.asarray([i for i, t in enumerate(data.title_ids) if len(t)], dtype=np.int64)
        fixed = len(self.head) + data.num_levels + len(self.answer) + 1
        self.lengths = np.asarray([fixed + len(data.title_ids[i]) for i in self.items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        item = int(self.items[i])
        title = self.data.title_ids[item]
        ids = np.concatenate([self.head, self.data.sid_ids[item], self.answer, title, [self.eos]]).astype(np.int64)
        labels = np.full_like(ids, -100)
        labels[-(len(title) + 1) :] = ids[-(len(title) + 1) :]
        return Example(ids, labels)


def build_item2sid(data: TaskData, fmt: PromptFormat) -> Item2SIDTask:
    return Item2SIDTask(data, fmt)


def build_sid2title(data: TaskData, fmt: PromptFormat) -> SID2TitleTask:
    return SID2TitleTask(data, fmt)
