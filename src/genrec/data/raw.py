"""What a reader hands to ``prepare``: streams of interactions and of item metadata.

Readers never load a raw file whole: both streams are generators over the file's lines,
and ``prepare`` keeps only the compact columns it needs (user, item, time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

# Item metadata fields every reader fills (empty string where the source has none).
ITEM_FIELDS = ("title", "brand", "categories", "description")


class Interaction(NamedTuple):
    user: str
    item: str
    # Seconds since the epoch, or the position in the user's sequence where the source
    # has no timestamps (then RawSource.has_timestamps is False).
    timestamp: float
    rating: float | None = None


class BadInput(ValueError):
    """A malformed raw line; the message names the file and the line number."""


@dataclass
class BadLineReport:
    """Malformed lines skipped under ``on_bad_line: skip``, counted per file."""

    on_bad_line: str = "error"
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def bad(self, path: str, line_no: int, why: str) -> None:
        """Raise BadInput, or count the line when skipping is allowed."""
        msg = f"{path}: line {line_no}: {why}"
        if self.on_bad_line == "error":
            raise BadInput(msg + " (set data.on_bad_line=skip to skip and count such lines)")
        self.skipped[path] = self.skipped.get(path, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(msg)


@dataclass
class RawSource:
    # Each call returns a fresh iterator, so prepare can pass over the data more than once.
    interactions: Callable[[], Iterator[Interaction]]
    # Dicts with key "item" (the raw item id, matching Interaction.item) and the
    # ITEM_FIELDS as strings (categories joined with ", "), plus any other fields.
    items: Callable[[], Iterator[dict]]
    has_timestamps: bool
    report: BadLineReport
    # Human-readable description of what was read (files), for stats.json.
    description: str = ""
