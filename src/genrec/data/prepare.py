"""The ``prepare`` stage: raw interactions -> de-duplicated, k-cored, ordered, split sequences.

Steps, in order (each is a function below and is tested on its own):
1. stream the reader's interactions into compact integer arrays (user, item, time, order);
2. drop interactions below ``min_rating`` (the reader does it) and duplicates of a
   (user, item) pair, keeping the earliest;
3. iterative k-core: drop users and items with fewer than k interactions until none is left;
4. order each user's interactions by time, ties broken by their order in the file (stable);
5. split: ``loo`` (last item test, second-to-last valid) or ``chrono`` (global time cut);
6. join item metadata (streamed, only for the surviving items) and write the dataset.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

from genrec.config import DataConfig
from genrec.data.raw import ITEM_FIELDS, RawSource
from genrec.io import write_json

log = logging.getLogger("genrec")


def _natural_key(raw: str) -> tuple:
    """Sort numeric ids numerically and everything else as text."""
    return (0, int(raw), "") if re.fullmatch(r"\d+", raw) else (1, 0, raw)


def collect(source: RawSource) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Stream interactions into (user_idx, item_idx, timestamp) arrays plus the raw id vocabularies."""
    from tqdm import tqdm

    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    times: list[float] = []
    for it in tqdm(source.interactions(), desc="reading interactions", unit=" lines", mininterval=1.0):
        users.append(user_index.setdefault(it.user, len(user_index)))
        items.append(item_index.setdefault(it.item, len(item_index)))
        times.append(float(it.timestamp))
    if not users:
        raise ValueError(f"no interactions were read from {source.description or 'the data source'}")
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(times, dtype=np.float64),
        list(user_index),
        list(item_index),
    )


def deduplicate(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Indices of interactions to keep: the earliest of each (user, item) pair (file order breaks ties)."""
    order = np.lexsort((np.arange(len(users)), times, items, users))
    u, i = users[order], items[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    return np.sort(order[first])


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions in the iterative k-core (every user and item has >= k)."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    while True:
        u_cnt = np.bincount(users[keep], minlength=users.max() + 1)
        i_cnt = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (u_cnt[users] >= k) & (i_cnt[items] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def split_positions(
    seq_times: list[np.ndarray], protocol: str, valid_frac: float = 0.1, test_frac: float = 0.1
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-user (valid_pos, test_pos), -1 where a user has no such target.

    ``loo``: test = last item, valid = second-to-last (users need >= 3 items).
    ``chrono``: two global time cut-offs t_v < t_t at the (1 - valid - test) and (1 - test)
    quantiles of all timestamps; a user's valid target is their first item in [t_v, t_t),
    the test target their first item at or after t_t; only items before a target are its history.
    """
    n = len(seq_times)
    valid_pos = np.full(n, -1, dtype=np.int64)
    test_pos = np.full(n, -1, dtype=np.int64)
    info: dict = {"protocol": protocol}
    if protocol == "loo":
        for u, t in enumerate(seq_times):
            if len(t) >= 3:
                valid_pos[u], test_pos[u] = len(t) - 2, len(t) - 1
        return valid_pos, test_pos, info
    all_t = np.concatenate(seq_times)
    t_valid = float(np.quantile(all_t, 1 - valid_frac - test_frac))
    t_test = float(np.quantile(all_t, 1 - test_frac))
    info.update(t_valid=t_valid, t_test=t_test)
    for u, t in enumerate(seq_times):
        in_valid = np.flatnonzero((t >= t_valid) & (t < t_test))
        in_test = np.flatnonzero(t >= t_test)
        # A target needs at least one item of history before it.
        if len(in_valid) and in_valid[0] > 0:
            valid_pos[u] = in_valid[0]
        if len(in_test) and in_test[0] > 0:
            test_pos[u] = in_test[0]
    return valid_pos, test_pos, info


def build_sequences(
    users: np.ndarray, items: np.ndarray, times: np.ndarray
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Group by user in time order; ties keep file order (the input order), i.e. a stable sort."""
    order = np.lexsort((np.arange(len(users)), times, users))
    u, i, t = users[order], items[order], times[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    starts = np.concatenate([[0], bounds])
    return u[starts].tolist(), np.split(i, bounds), np.split(t, bounds)


def item_table(source: RawSource, raw_ids: list[str]) -> tuple[pd.DataFrame, dict]:
    """Metadata of the kept items in ``raw_ids`` order; missing titles reported, not dropped."""
    wanted = {raw: idx for idx, raw in enumerate(raw_ids)}
    rows: list[dict | None] = [None] * len(raw_ids)
    for meta in source.items():
        idx = wanted.get(str(meta.get("item", "")))
        if idx is not None and rows[idx] is None:
            rows[idx] = meta
    missing_meta = [raw_ids[i] for i, r in enumerate(rows) if r is None]
    records = []
    for idx, (raw, meta) in enumerate(zip(raw_ids, rows)):
        rec = {"item_id": idx, "raw_id": raw}
        meta = meta or {}
        for f in ITEM_FIELDS:
            rec[f] = str(meta.get(f) or "")
        for k, v in meta.items():
            if k not in rec and k != "item" and v is not None:
                rec[k] = v if isinstance(v, (int, float)) else str(v)
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    empty_title = df.index[df["title"].str.strip() == ""].tolist()
    report = {
        "items_without_metadata": len(missing_meta),
        "items_without_metadata_examples": missing_meta[:10],
        "items_without_title": len(empty_title),
        "items_without_title_examples": df.loc[empty_title[:10], "raw_id"].tolist(),
    }
    if empty_title:
        log.warning(
            "%d items have no title (e.g. %s); their text falls back to brand/categories/description",
            len(empty_title),
            ", ".join(report["items_without_title_examples"][:3]),
        )
    return df, report


def prepare(source: RawSource, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Everything of the stage except writing: returns (items, sequences, stats)."""
    if cfg.protocol == "chrono" and not source.has_timestamps:
        raise ValueError(
            f"data.protocol=chrono needs timestamps, but {source.description} has none: use data.protocol=loo"
        )
    users, items, times, raw_users, raw_items = collect(source)
    n_raw = len(users)
    keep = deduplicate(users, items, times)
    n_dup = n_raw - len(keep)
    users, items, times = users[keep], items[keep], times[keep]
    core = kcore(users, items, cfg.kcore)
    users, items, times = users[core], items[core], times[core]
    if not len(users):
        raise ValueError(f"no interaction survives the {cfg.kcore}-core: lower data.kcore")

    # Re-index the survivors: items and users in natural order of their raw ids, so
    # datasets that come with integer ids (LC-Rec, S3-Rec) keep their numbering.
    item_kept = np.unique(items)
    item_raw = sorted((raw_items[i] for i in item_kept), key=_natural_key)
    item_new = {raw: j for j, raw in enumerate(item_raw)}
    item_map = np.full(len(raw_items), -1, dtype=np.int64)
    item_map[item_kept] = [item_new[raw_items[i]] for i in item_kept]
    user_kept = np.unique(users)
    user_raw = sorted((raw_users[u] for u in user_kept), key=_natural_key)
    user_new = {raw: j for j, raw in enumerate(user_raw)}
    user_map = np.full(len(raw_users), -1, dtype=np.int64)
    user_map[user_kept] = [user_new[raw_users[u]] for u in user_kept]
    users, items = user_map[users], item_map[items]

    uids, seqs, seq_times = build_sequences(users, items, times)
    valid_pos, test_pos, split_info = split_positions(seq_times, cfg.protocol, cfg.chrono_valid, cfg.chrono_test)
    sequences = pd.DataFrame(
        {
            "user_id": np.asarray(uids, dtype=np.int64),
            "raw_user": [user_raw[u] for u in uids],
            "item_ids": [s.astype(np.int64) for s in seqs],
            "timestamps": [t.astype(np.float64) for t in seq_times],
            "valid_pos": valid_pos,
            "test_pos": test_pos,
        }
    )
    items_df, item_report = item_table(source, item_raw)
    lengths = np.array([len(s) for s in seqs])
    stats = {
        "source": source.description,
        "users": int(len(seqs)),
        "items": int(len(item_raw)),
        "interactions": int(lengths.sum()),
        "density": float(lengths.sum() / (len(seqs) * len(item_raw))),
        "avg_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "min_length": int(lengths.min()),
        "raw_interactions": int(n_raw),
        "duplicates_dropped": int(n_dup),
        "kcore": cfg.kcore,
        "kcore_dropped": int(n_raw - n_dup - len(users)),
        "valid_users": int((valid_pos >= 0).sum()),
        "test_users": int((test_pos >= 0).sum()),
        "has_timestamps": bool(source.has_timestamps),
        "split": split_info,
        "bad_lines_skipped": dict(source.report.skipped),
        "bad_line_examples": list(source.report.examples),
        **item_report,
    }
    return items_df, sequences, stats


def format_stats(stats: dict) -> str:
    keys = [
        "users",
        "items",
        "interactions",
        "avg_length",
        "max_length",
        "density",
        "duplicates_dropped",
        "kcore_dropped",
        "valid_users",
        "test_users",
        "items_without_title",
    ]
    width = max(len(k) for k in keys)
    lines = [
        f"  {k:<{width}}  {stats[k]:.6g}" if isinstance(stats[k], float) else f"  {k:<{width}}  {stats[k]:,}"
        for k in keys
    ]
    skipped = sum(stats["bad_lines_skipped"].values())
    if skipped:
        lines.append(f"  {'bad_lines_skipped':<{width}}  {skipped:,}")
    return "\n".join(lines)


def run(ctx) -> dict:
    from genrec.data.readers import open_source

    source = open_source(ctx.cfg.data)
    items_df, sequences, stats = prepare(source, ctx.cfg.data)
    items_df.to_parquet(ctx.out / "items.parquet", index=False)
    sequences.to_parquet(ctx.out / "sequences.parquet", index=False)
    write_json(ctx.out / "stats.json", stats)
    print(f"dataset statistics ({stats['source']}):\n{format_stats(stats)}")
    return {k: stats[k] for k in ("users", "items", "interactions", "avg_length")}
