"""The Semantic-ID vocabulary: which token stands for which (level, code), and its id.

The token of level ``t``, code ``c`` is ``<{'abcdefgh'[t]}_{c}>`` (``<a_12><b_3><c_200>`` is
one item), and its id in the model's vocabulary is ``offsets[t] + c``: each level's tokens
occupy a contiguous id range, so constrained decoding reads a level's logits as one slice
and SID <-> ids is an addition, never a lookup.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

LEVEL_LETTERS = string.ascii_lowercase[:8]


def sid_tokens(codebook_sizes: Sequence[int]) -> list[str]:
    """Every SID token for these codebook sizes, level by level, codes in order."""
    return [SIDVocab.token(t, c) for t, size in enumerate(codebook_sizes) for c in range(size)]


class SIDVocab:
    """Token strings and ids of every SID code; ``offsets[t]`` is the id of ``<level t, code 0>``."""

    def __init__(self, codebook_sizes: Sequence[int], offsets: Sequence[int]):
        self.codebook_sizes = [int(v) for v in codebook_sizes]
        self.offsets = [int(v) for v in offsets]
        if not 1 <= len(self.codebook_sizes) <= len(LEVEL_LETTERS):
            raise ValueError(f"SIDs must have 1 to {len(LEVEL_LETTERS)} levels, got {len(self.codebook_sizes)}")
        if len(self.offsets) != len(self.codebook_sizes):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.codebook_sizes)} SID levels")
        if min(self.codebook_sizes) < 1 or min(self.offsets) < 0:
            raise ValueError(f"codebook sizes must be >= 1 and offsets >= 0, got {self.codebook_sizes}, {self.offsets}")
        ranges = sorted(zip(self.offsets, self.codebook_sizes))
        for (start, size), (nxt, _) in zip(ranges, ranges[1:]):
            if start + size > nxt:
                raise ValueError(
                    f"SID levels overlap in the vocabulary: offsets {self.offsets}, sizes {self.codebook_sizes}"
                )

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @staticmethod
    def token(level: int, code: int) -> str:
        return f"<{LEVEL_LETTERS[level]}_{code}>"

    def all_tokens(self) -> list[str]:
        """Every SID token, level by level, codes in order: the order their ids must follow."""
        return sid_tokens(self.codebook_sizes)

    def all_token_ids(self) -> list[int]:
        """The ids of ``all_tokens()``, in the same order."""
        return [off + c for off, size in zip(self.offsets, self.codebook_sizes) for c in range(size)]

    def sid_string(self, codes: Sequence[int]) -> str:
        """One item's SID as text, e.g. ``<a_12><b_3><c_200>``."""
        return "".join(self.token(t, int(c)) for t, c in enumerate(codes))

    def sid_to_ids(self, codes):
        """Codes (..., L) -> token ids (..., L); numpy arrays or torch tensors."""
        self._check_last_dim(codes)
        if isinstance(codes, np.ndarray):
            return codes.astype(np.int64) + np.asarray(self.offsets, dtype=np.int64)
        return codes + codes.new_tensor(self.offsets)

    def ids_to_sid(self, ids):
        """Token ids (..., L) -> codes (..., L); raises if an id is not a SID token of its level."""
        self._check_last_dim(ids)
        if isinstance(ids, np.ndarray):
            codes = ids.astype(np.int64) - np.asarray(self.offsets, dtype=np.int64)
            bad = (codes < 0) | (codes >= np.asarray(self.codebook_sizes))
        else:
            codes = ids - ids.new_tensor(self.offsets)
            bad = (codes < 0) | (codes >= codes.new_tensor(self.codebook_sizes))
        if bad.any():
            raise ValueError(
                f"token ids outside their level's SID range (offsets {self.offsets}, sizes {self.codebook_sizes})"
            )
        return codes

    def _check_last_dim(self, arr) -> None:
        if arr.shape[-1] != self.num_levels:
            raise ValueError(
                f"expected SIDs of {self.num_levels} levels in the last dimension, got shape {tuple(arr.shape)}"
            )

    @classmethod
    def from_tokenizer(cls, tokenizer, codebook_sizes: Sequence[int]) -> SIDVocab:
        """Read the offsets from a tokenizer holding the SID tokens, checking that each level is contiguous."""
        offsets = []
        for t, size in enumerate(codebook_sizes):
            tokens = [cls.token(t, c) for c in range(size)]
            ids = tokenizer.convert_tokens_to_ids(tokens)
            unk = getattr(tokenizer, "unk_token_id", None)
            if any(i is None or (unk is not None and i == unk) for i in ids):
                raise ValueError(f"the tokenizer lacks SID tokens of level {t} (e.g. {tokens[0]}): add them first")
            if ids != list(range(ids[0], ids[0] + size)):
                raise ValueError(f"the tokenizer's SID tokens of level {t} do not have contiguous ids")
            offsets.append(ids[0])
        return cls(codebook_sizes, offsets)

    def to_json(self) -> dict:
        return {"codebook_sizes": self.codebook_sizes, "offsets": self.offsets}

    @classmethod
    def from_json(cls, data: dict) -> SIDVocab:
        return cls(data["codebook_sizes"], data["offsets"])

    def __repr__(self) -> str:
        return f"SIDVocab(codebook_sizes={self.codebook_sizes}, offsets={self.offsets})"
