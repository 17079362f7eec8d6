"""The prefix trie over every item's Semantic ID, stored as dense transition tensors.

Level ``t`` has ``num_nodes_t`` nodes, one per distinct SID prefix of length ``t`` (level 0
has one node: the root, id 0), numbered in lexicographic order of their prefixes.
``transitions[t][node, code]`` is the node reached at level ``t + 1`` by appending
``code``, or -1 when no item's SID continues that way; at the last level the entry is the
``item_id`` itself. So "which codes may follow these prefixes" for a whole batch of beams
is one gather, ``transitions[t][nodes] >= 0``, and no Python loop runs over beams.

Memory: ``sum_t num_nodes_t * V_t`` int64 entries, e.g. 3 levels x 256 over 12,101 items
is at most (1 + 256 + 12,101) x 256 x 8 bytes = 25 MB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from genrec.io import atomic_write_bytes


class SIDTrie:
    """All valid SIDs: batched "allowed next codes" queries and SID -> item lookup."""

    def __init__(self, codes: np.ndarray | torch.Tensor, codebook_sizes: Sequence[int] | None = None):
        codes = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"SIDTrie needs codes of shape (num_items, num_levels), got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"SIDTrie needs integer codes, got dtype {codes.dtype}")
        codes = codes.astype(np.int64)
        n, num_levels = codes.shape
        if codes.min() < 0:
            row = int(np.argwhere(codes < 0)[0, 0])
            raise ValueError(f"SID codes must be >= 0; item {row} has {codes[row].tolist()}")
        if codebook_sizes is None:
            codebook_sizes = (codes.max(axis=0) + 1).tolist()
        codebook_sizes = [int(v) for v in codebook_sizes]
        if len(codebook_sizes) != num_levels:
            raise ValueError(f"codebook_sizes has {len(codebook_sizes)} entries but the codes have {num_levels} levels")
        too_big = np.flatnonzero((codes >= np.asarray(codebook_sizes)).any(axis=1))
        if len(too_big):
            i = int(too_big[0])
            raise ValueError(
                f"item {i} has SID {codes[i].tolist()}, outside codebook_sizes {codebook_sizes} "
                f"({len(too_big)} such items)"
            )
        _check_unique(codes)

        # inverse[t][i] = node id of item i's prefix of length t; lexicographic ranks from np.unique.
        inverse = [np.zeros(n, dtype=np.int64)]
        for t in range(1, num_levels):
            _, inv = np.unique(codes[:, :t], axis=0, return_inverse=True)
            inverse.append(inv.reshape(-1).astype(np.int64))
        inverse.append(np.arange(n, dtype=np.int64))  # "nodes" after the last level are the items
        transitions = []
        for t in range(num_levels):
            num_nodes = int(inverse[t].max()) + 1
            table = np.full((num_nodes, codebook_sizes[t]), -1, dtype=np.int64)
            # Items sharing a prefix write the same child id, so repeated writes agree.
            table[inverse[t], codes[:, t]] = inverse[t + 1]
            transitions.append(torch.from_numpy(table))

        self.num_levels = num_levels
        self.num_items = n
        self.codebook_sizes = codebook_sizes
        self.transitions: list[torch.Tensor] = transitions
        self.codes = torch.from_numpy(codes)  # (N, L): row i is the SID of item i

    @property
    def device(self) -> torch.device:
        return self.transitions[0].device

    def allowed_mask(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Codes allowed at ``level`` after each node: nodes (B,) long -> (B, V_level) bool; node -1 allows nothing."""
        self._check_level(level)
        valid = nodes >= 0
        rows = self.transitions[level][nodes.clamp(min=0)]  # (B, V_level)
        return (rows >= 0) & valid.unsqueeze(-1)

    def advance(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The node at ``level + 1`` (the item id after the last level) reached from ``nodes`` by ``codes``: (B,) -> (B,), -1 if invalid."""
        self._check_level(level)
        size = self.codebook_sizes[level]
        valid = (nodes >= 0) & (codes >= 0) & (codes < size)
        nxt = self.transitions[level][nodes.clamp(min=0), codes.clamp(0, size - 1)]
        return torch.where(valid, nxt, torch.full_like(nxt, -1))

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node reached by each prefix: (B, t) long -> (B,) long, -1 where the prefix is no item's."""
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for t in range(prefixes.shape[1]):
            nodes = self.advance(t, nodes, prefixes[:, t])
        return nodes

    def allowed(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Allowed next codes after each prefix: (B, t) long with 0 <= t < L -> (B, V_t) bool."""
        if prefixes.ndim != 2 or prefixes.shape[1] >= self.num_levels:
            raise ValueError(f"prefixes must have shape (B, t) with t < {self.num_levels}, got {tuple(prefixes.shape)}")
        return self.allowed_mask(prefixes.shape[1], self.walk(prefixes))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Item id of each complete SID: (B, L) long -> (B,) long, -1 where the SID is no item's."""
        if codes.ndim != 2 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must have shape (B, {self.num_levels}), got {tuple(codes.shape)}")
        return self.walk(codes)

    def to(self, device: torch.device | str) -> SIDTrie:
        self.transitions = [t.to(device) for t in self.transitions]
        self.codes = self.codes.to(device)
        return self

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "codebook_sizes": self.codebook_sizes,
                "codes": self.codes.cpu(),
                "transitions": [t.cpu() for t in self.transitions],
            },
            buf,
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> SIDTrie:
        state = torch.load(path, map_location="cpu", weights_only=True)
        trie = cls.__new__(cls)
        trie.codes = state["codes"]
        trie.num_items, trie.num_levels = trie.codes.shape
        trie.codebook_sizes = list(state["codebook_sizes"])
        trie.transitions = list(state["transitions"])
        return trie

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in 0..{self.num_levels - 1}, got {level}")


def _check_unique(codes: np.ndarray) -> None:
    """Raise ValueError naming the items that share a SID."""
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    shared = np.flatnonzero(counts[inv] > 1)
    if len(shared):
        first = codes[shared[0]]
        same = np.flatnonzero((codes == first).all(axis=1))
        raise ValueError(
            f"SIDs must be unique, but {len(shared)} items share a SID with another item, e.g. items "
            f"{same[:10].tolist()} all have SID {first.tolist()}: resolve collisions first "
            "(sid.collision=dedup or sinkhorn)"
        )
