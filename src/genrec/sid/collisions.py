"""Making every item's SID unique: collision statistics and the three resolution strategies.

- ``dedup`` (GREAM, TIGER): append one level whose code is the item's rank inside the
  group of items sharing its SID (0 for an item alone; the rank orders by reconstruction
  error, then item_id). SIDs grow by one token; the extra level has max-group-size codes.
- ``sinkhorn`` (LC-Rec): colliding items are re-assigned at the last level by a balanced
  (Sinkhorn) assignment over all of them, which spreads a crowd over many codes, for a few
  rounds; items still colliding then move to the nearest free SID. The SID length stays.
- ``item`` (a hierarchical ID): append one level whose code is the item_id itself, so the
  semantic prefix names a group of similar items and the last token is the item's own, with
  its own input and output embedding (as an ID-based model has). The extra level has one
  code per item, so the vocabulary grows with the catalogue (docs/sid.md).

A quantiser here is any object with ``codebook_sizes``, ``level_costs(x, prefix) -> (N, K_t)``
and ``reconstruct(codes) -> (N, D)`` (see genrec.sid.kmeans and genrec.sid.rqvae).
"""

from __future__ import annotations

import numpy as np

from genrec.sid.kmeans import balanced_assign

# Rounds of the Sinkhorn re-assignment before the nearest-free fallback (LC-Rec uses 20).
SINKHORN_ROUNDS = 20


def group_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item the index of its distinct SID, and the size of each distinct SID's group."""
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inv.reshape(-1), counts


def collision_stats(codes: np.ndarray) -> dict:
    """``collision_rate`` = 1 - distinct SIDs / items (the share of items that must move to be unique)."""
    inv, counts = group_ids(codes)
    n = len(codes)
    return {
        "n_items": n,
        "n_distinct": int(len(counts)),
        "collision_rate": float(1.0 - len(counts) / n),
        "items_in_collisions": float((counts[inv] > 1).mean()),
        "max_group": int(counts.max()),
    }


def dedup_level(codes: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, int]:
    """Append the rank of each item in its SID group (by ``errors`` (N,), then item_id): (N, L + 1) and the level's size."""
    inv, counts = group_ids(codes)
    order = np.lexsort((np.arange(len(codes)), errors, inv))  # grouped, best reconstruction first
    starts = np.searchsorted(inv[order], inv[order], side="left")
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts
    return np.concatenate([codes, rank[:, None]], axis=1), int(counts.max())


def colliding(codes: np.ndarray) -> np.ndarray:
    """Indices of items whose SID some other item shares."""
    inv, counts = group_ids(codes)
    return np.flatnonzero(counts[inv] > 1)


def sinkhorn_rounds(quantizer, x: np.ndarray, codes: np.ndarray, rounds: int = SINKHORN_ROUNDS) -> np.ndarray:
    """Re-assign the last code of colliding items by a balanced assignment over them, up to ``rounds`` times."""
    codes = codes.copy()
    last = codes.shape[1] - 1
    for _ in range(rounds):
        idx = colliding(codes)
        if not len(idx):
            break
        cost = quantizer.level_costs(x[idx], codes[idx, :last])  # (n_colliding, K_last)
        codes[idx, last] = balanced_assign(cost)
    return codes


def nearest_free(quantizer, x: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Move every item that shares its SID, except the lowest item_id, to the nearest SID nobody holds.

    "Nearest": keep the longest prefix whose subtree still has a free SID, then descend,
    taking at each level the closest code whose subtree is not full. Counting the SIDs
    held under every prefix makes each move a straight descent (L calls of ``level_costs``).
    Loops over the items that move only.
    """
    codes = codes.copy()
    sizes = [int(s) for s in quantizer.codebook_sizes]
    num_levels = codes.shape[1]
    # capacity[t]: how many SIDs a prefix of length t covers.
    capacity = [int(np.prod(sizes[t:], dtype=np.float64)) for t in range(num_levels + 1)]
    if len(codes) > capacity[0]:
        raise ValueError(
            f"{len(codes)} items cannot have distinct SIDs in {' x '.join(map(str, sizes))} codes: "
            "raise sid.codebook_size or sid.levels, or use sid.collision=dedup"
        )
    inv, _ = group_ids(codes)
    _, first = np.unique(inv, return_index=True)
    movers = np.setdiff1d(np.arange(len(codes)), first)
    held: dict[tuple, int] = {}

    def hold(sid: tuple) -> None:
        for t in range(num_levels + 1):
            held[sid[:t]] = held.get(sid[:t], 0) + 1

    for sid in codes[first].tolist():
        hold(tuple(sid))
    for i in movers.tolist():
        sid = tuple(codes[i].tolist())
        depth = max(t for t in range(num_levels) if held.get(sid[:t], 0) < capacity[t])
        node = sid[:depth]
        while len(node) < num_levels:
            costs = quantizer.level_costs(x[i : i + 1], np.asarray([node], dtype=np.int64).reshape(1, -1))[0]
            node = next(
                child
                for child in (node + (int(c),) for c in np.argsort(costs, kind="stable"))
                if held.get(child, 0) < capacity[len(child)]
            )
        codes[i] = node
        hold(node)
    return codes, len(movers)


def resolve_collisions(
    quantizer, x: np.ndarray, codes: np.ndarray, strategy: str
) -> tuple[np.ndarray, list[int], dict]:
    """Unique SIDs for every item: (codes (N, L'), codebook sizes (L',), info about what moved)."""
    before = collision_stats(codes)
    sizes = list(quantizer.codebook_sizes)
    if strategy == "dedup":
        errors = ((x - quantizer.reconstruct(codes)) ** 2).sum(1)
        out, extra = dedup_level(codes, errors)
        info = {"strategy": "dedup", "extra_level_size": extra}
        sizes = [*sizes, extra]
    elif strategy == "item":
        out = np.concatenate([codes, np.arange(len(codes), dtype=codes.dtype)[:, None]], axis=1)
        info = {"strategy": "item", "extra_level_size": len(codes)}
        sizes = [*sizes, len(codes)]
    elif strategy == "sinkhorn":
        if len(codes) > int(np.prod(sizes, dtype=np.float64)):
            raise ValueError(
                f"sid.collision=sinkhorn needs at least as many SIDs as items: {' x '.join(map(str, sizes))} "
                f"codes < {len(codes)} items; raise sid.codebook_size or sid.levels, or use sid.collision=dedup"
            )
        balanced = sinkhorn_rounds(quantizer, x, codes)
        out, moved = nearest_free(quantizer, x, balanced)
        info = {
            "strategy": "sinkhorn",
            "changed_by_sinkhorn": int((balanced != codes).any(axis=1).sum()),
            "collision_rate_after_sinkhorn": collision_stats(balanced)["collision_rate"],
            "moved_to_nearest_free": moved,
        }
    else:
        raise ValueError(f"sid.collision must be 'dedup', 'sinkhorn' or 'item', got {strategy!r}")
    final = collision_stats(out)
    if final["n_distinct"] != len(out):
        raise AssertionError(f"collision resolution left {len(out) - final['n_distinct']} duplicate SIDs")
    return out, sizes, {"before": before, **info}
