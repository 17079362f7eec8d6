"""The prepared dataset: what every model after ``prepare`` reads.

``dataset/items.parquet``: one row per item, ``item_id`` 0..N-1 in row order, ``raw_id``
(the source's id), ``title``, ``brand``, ``categories``, ``description`` (strings, possibly
empty) and whatever other fields the source had.

``dataset/sequences.parquet``: one row per user, ``user_id`` 0..U-1, ``raw_user``,
``item_ids`` (time order), ``timestamps`` (seconds, or positions where the source has
none), ``valid_pos`` and ``test_pos``: the index in ``item_ids`` of the user's valid and
test target, -1 where the user has none. Everything before ``valid_pos`` (or
``test_pos`` when there is no valid target) is training data; a test history includes
the valid item, as in the leave-one-out protocol of SASRec, P5 and TIGER.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("valid", "test")


@dataclass
class Examples:
    """Held-out targets of one split, one per user that has one."""

    split: str
    user_ids: np.ndarray  # (U,) int64
    histories: list[np.ndarray]  # the last max_history items before the target
    targets: np.ndarray  # (U,) int64
    seen: list[np.ndarray]  # every item before the target (for exclude_seen)

    def __len__(self) -> int:
        return len(self.targets)


class Dataset:
    def __init__(self, items: pd.DataFrame, sequences: pd.DataFrame, max_history: int = 20):
        self.items = items.reset_index(drop=True)
        self.max_history = max_history
        self.user_ids = sequences["user_id"].to_numpy(np.int64)
        self.raw_users = sequences["raw_user"].astype(str).tolist()
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences["item_ids"]]
        self.valid_pos = sequences["valid_pos"].to_numpy(np.int64)
        self.test_pos = sequences["test_pos"].to_numpy(np.int64)
        if not np.array_equal(self.items["item_id"].to_numpy(), np.arange(len(self.items))):
            raise ValueError("items.item_id must be 0..N-1 in row order")

    @classmethod
    def load(cls, path: str | Path, max_history: int = 20) -> Dataset:
        path = Path(path)
        for name in ("items.parquet", "sequences.parquet"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: run the 'prepare' stage first")
        return cls(pd.read_parquet(path / "items.parquet"), pd.read_parquet(path / "sequences.parquet"), max_history)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def titles(self) -> list[str]:
        return self.items["title"].fillna("").astype(str).tolist()

    @property
    def categories(self) -> list[str]:
        """Each item's category string ("" where the source has none, or no categories column)."""
        if "categories" not in self.items:
            return [""] * self.num_items
        return self.items["categories"].fillna("").astype(str).tolist()

    def train_end(self, u: int) -> int:
        """Number of leading items of user ``u`` that are training data."""
        held = [p for p in (self.valid_pos[u], self.test_pos[u]) if p >= 0]
        return int(min(held)) if held else len(self.sequences[u])

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training items in time order (no valid or test item)."""
        return [seq[: self.train_end(u)] for u, seq in enumerate(self.sequences)]

    def examples(self, split: str) -> Examples:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pos = self.valid_pos if split == "valid" else self.test_pos
        users = np.flatnonzero(pos >= 0)
        histories, seen, targets = [], [], []
        for u in users:
            before = self.sequences[u][: pos[u]]
            seen.append(before)
            histories.append(before[-self.max_history :])
            targets.append(self.sequences[u][pos[u]])
        return Examples(split, users.astype(np.int64), histories, np.asarray(targets, dtype=np.int64), seen)

    def item_popularity(self) -> np.ndarray:
        """Interaction counts per item over the training parts of the sequences."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        for seq in self.train_sequences():
            np.add.at(counts, seq, 1)
        return counts
