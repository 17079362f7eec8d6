"""Interest mining (MLIM): ask every backend about every item and user, validate, merge, write.

Each question goes through the :class:`~genrec.interests.cache.CallCache`, which commits
every answer as it arrives; that file is the mining's incremental state. A killed run,
rerun, finds every answered question there and pays only for the rest; the parquet
outputs are written at the end from the cached answers.

A malformed answer is asked again with the problem quoted back (a new prompt, so it is
cached too), up to ``malformed_retries`` times; a call that keeps failing (timeouts, 429,
5xx) is retried by its backend. Then either is recorded as a failure, in the cache and in
``failures.json``, and mining goes on. Only a :class:`BackendError` (a wrong key or model)
stops it, as every later call would fail the same way.

User prompts see only the training part of each history: never a valid or test item.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from genrec.data.dataset import Dataset
from genrec.interests.backends import CallFailed, ChatBackend, VisionBackend, make_backend
from genrec.interests.cache import CallCache, call_key
from genrec.interests.config import InterestsConfig
from genrec.interests.merge import EmbedFn, load_embedder, merge_all
from genrec.interests.offline import OfflineMiner
from genrec.interests.prompts import caption_messages, correction_messages, describe_item, item_messages, user_messages
from genrec.interests.schema import Interest, MalformedAnswer, parse_caption, parse_interests
from genrec.io import write_json

log = logging.getLogger("genrec")

T = TypeVar("T")
Backend = ChatBackend | OfflineMiner
OUTPUT_COLUMNS = ["rank", "interest", "rationale", "confidence", "backends", "agreement", "weight"]


@dataclass
class MiningResult:
    """Merged interests, one row per (id, interest), and the questions that failed."""

    frame: pd.DataFrame
    failures: list[dict] = field(default_factory=list)


def ask(
    backend: ChatBackend, messages: list[dict], cache: CallCache, parse: Callable[[str], T], malformed_retries: int
) -> T:
    """One validated answer, through the cache; raises CallFailed or MalformedAnswer once retries are spent."""
    retries_left = malformed_retries
    while True:
        key = call_key(backend.name, backend.model, messages, backend.params)
        try:
            result = cache.fetch(key, backend.name, backend.model, functools.partial(backend.complete, messages))
        except CallFailed as exc:
            cache.record_failure(key, backend.name, backend.model, exc.reason, str(exc))
            raise
        try:
            return parse(result.text)
        except MalformedAnswer as exc:
            if retries_left == 0:
                cache.record_failure(key, backend.name, backend.model, exc.reason, str(exc))
                raise
            retries_left -= 1
            log.debug("backend %s: %s answer, asking again", backend.name, exc.reason)
            messages = correction_messages(messages, result.text, str(exc))


def _run_questions(
    ids: Sequence[Hashable],
    backends: Sequence[Backend],
    answer: Callable[[Backend, Hashable], T],
    kind: str,
    progress: bool,
) -> tuple[dict[Hashable, dict[str, T]], list[dict]]:
    """``answer(backend, id)`` for every id and backend, each backend with its own pool of threads.

    Returns the answers by id and backend (in the backends' order) and the failures.
    """
    from tqdm.auto import tqdm

    got: dict[Hashable, dict[str, T]] = defaultdict(dict)
    failures = []
    pools = {b.name: ThreadPoolExecutor(b.max_concurrency, thread_name_prefix=f"genrec-{b.name}") for b in backends}
    futures: dict[Future, tuple[Hashable, str]] = {}
    try:
        for b in backends:
            for i in ids:
                futures[pools[b.name].submit(answer, b, i)] = (i, b.name)
        for fut in tqdm(
            as_completed(futures),
            total=len(futures),
            desc=f"mining {kind} interests",
            disable=not progress,
            mininterval=2.0,
        ):
            i, name = futures[fut]
            try:
                got[i][name] = fut.result()
            except (CallFailed, MalformedAnswer) as exc:
                failures.append({"kind": kind, "id": i, "backend": name, "reason": exc.reason, "detail": str(exc)})
    finally:
        # On an interrupt or a BackendError: drop the questions not yet asked, let the ones in
        # flight finish (their answers land in the cache for the rerun).
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
    order = [b.name for b in backends]
    ordered = {i: {n: got[i][n] for n in order if n in got[i]} for i in ids if i in got}
    return ordered, failures


def _to_frame(id_column: str, ids: Sequence[Hashable], merged: dict) -> pd.DataFrame:
    rows = [
        {
            id_column: i,
            "rank": r,
            "interest": m.interest,
            "rationale": m.rationale,
            "confidence": m.confidence,
            "backends": list(m.backends),
            "agreement": m.agreement,
            "weight": m.weight,
        }
        for i in ids
        for r, m in enumerate(merged.get(i, []))
    ]
    frame = pd.DataFrame(rows, columns=[id_column, *OUTPUT_COLUMNS])
    return frame.astype(
        {id_column: "int64", "rank": "int64", "confidence": "float64", "agreement": "float64", "weight": "float64"}
    )


def _item_records(items: pd.DataFrame, captions: dict[int, str] | None) -> list[dict]:
    records = items.to_dict("records")
    for i, caption in (captions or {}).items():
        records[i] = {**records[i], "caption": caption}
    return records


def mine_item_interests(
    items: pd.DataFrame,
    backends: Sequence[Backend],
    cache: CallCache,
    cfg: InterestsConfig,
    embed_fn: EmbedFn | None = None,
    captions: dict[int, str] | None = None,
    item_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> MiningResult:
    """Interests of each item (all, or ``item_ids``) from every backend, merged.

    ``captions`` (item_id -> image description) join the item's evidence where given.
    """
    records = _item_records(items, captions)
    ids = list(range(len(items))) if item_ids is None else [int(i) for i in item_ids]

    def answer(backend: Backend, item_id: int) -> list[Interest]:
        if isinstance(backend, OfflineMiner):
            return backend.item_interests(item_id)
        if describe_item(records[item_id], cfg.max_field_chars) == "(no information)":
            raise MalformedAnswer("no_evidence", f"item {item_id} has no title, brand, categories or description")
        messages = item_messages(records[item_id], cfg.max_interests, cfg.max_field_chars)
        parse = functools.partial(parse_interests, max_interests=cfg.max_interests)
        return ask(backend, messages, cache, parse, cfg.malformed_retries)

    answers, failures = _run_questions(ids, backends, answer, "item", progress)
    merged = merge_all(answers, embed_fn, cfg.merge_threshold)
    return MiningResult(_to_frame("item_id", ids, merged), failures)


def mine_user_interests(
    dataset: Dataset,
    backends: Sequence[Backend],
    cache: CallCache,
    cfg: InterestsConfig,
    embed_fn: EmbedFn | None = None,
    reviews: Sequence[Sequence[str]] | None = None,
    captions: dict[int, str] | None = None,
    user_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> MiningResult:
    """Interests of each user from the last ``cfg.user_history`` items of their training history.

    ``reviews[u]``, where the data has review text, is aligned with user ``u``'s full sequence.
    """
    records = _item_records(dataset.items, captions)
    train = dataset.train_sequences()
    ids = list(range(dataset.num_users)) if user_ids is None else [int(u) for u in user_ids]

    def answer(backend: Backend, user: int) -> list[Interest]:
        end = len(train[user])
        start = max(0, end - cfg.user_history)
        history = train[user][start:end]
        if len(history) == 0:
            raise MalformedAnswer("no_evidence", f"user {user} has no training items")
        if isinstance(backend, OfflineMiner):
            return backend.user_interests(history)
        texts = list(reviews[user][start:end]) if reviews is not None else None
        messages = user_messages([records[i] for i in history], cfg.max_interests, cfg.max_field_chars, texts)
        parse = functools.partial(parse_interests, max_interests=cfg.max_interests)
        return ask(backend, messages, cache, parse, cfg.malformed_retries)

    answers, failures = _run_questions(ids, backends, answer, "user", progress)
    merged = merge_all(answers, embed_fn, cfg.merge_threshold)
    return MiningResult(_to_frame("user_id", ids, merged), failures)


def caption_items(
    items: pd.DataFrame,
    vision: VisionBackend,
    cache: CallCache,
    cfg: InterestsConfig,
    image_root: str | Path | None = None,
    item_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[dict[int, str], list[dict]]:
    """Descriptions of the items that have an image in ``cfg.image_field``, by a VisionBackend."""
    if cfg.image_field not in items.columns:
        return {}, []
    images = items[cfg.image_field].fillna("").astype(str).str.strip()
    wanted = set(range(len(items))) if item_ids is None else {int(i) for i in item_ids}
    ids = [i for i in range(len(items)) if images.iloc[i] and i in wanted]

    def answer(backend: VisionBackend, item_id: int) -> str:
        try:
            part = backend.image_part(images.iloc[item_id], image_root)
        except (OSError, ValueError) as exc:
            raise MalformedAnswer("image_unreadable", str(exc)) from None
        messages = caption_messages(str(items["title"].iloc[item_id]), part, cfg.max_field_chars)
        return ask(backend, messages, cache, parse_caption, cfg.malformed_retries)

    answers, failures = _run_questions(ids, [vision], answer, "caption", progress)
    return {i: per[vision.name] for i, per in answers.items()}, failures


def _lazy_embedder(spec: str) -> EmbedFn:
    """The configured encoder, loaded on first use (a single backend never needs it)."""
    loaded: list[EmbedFn] = []

    def embed(texts: list[str]) -> np.ndarray:
        if not loaded:
            loaded.append(load_embedder(spec))
        return loaded[0](texts)

    return embed


def mine(
    dataset: Dataset,
    cfg: InterestsConfig,
    out_dir: str | Path,
    cache_path: str | Path,
    embed_fn: EmbedFn | None = None,
    reviews: Sequence[Sequence[str]] | None = None,
    image_root: str | Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: bool = True,
) -> dict:
    """Everything the stage does: caption, mine items and users, write the outputs, return a summary.

    Writes ``item_interests.parquet`` and/or ``user_interests.parquet`` (id, rank, interest,
    rationale, confidence, backends, agreement, weight), ``failures.json`` and
    ``mining.json`` (counts, cache statistics, tokens).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    backends = [make_backend(b, cfg, dataset.items, sleep) for b in cfg.backends]
    embed_fn = embed_fn or _lazy_embedder(cfg.embedder)
    item_ids = range(min(cfg.max_items, dataset.num_items) if cfg.max_items else dataset.num_items)
    user_ids = range(min(cfg.max_users, dataset.num_users) if cfg.max_users else dataset.num_users)
    summary: dict[str, Any] = {"backends": [b.name for b in backends]}
    failures: list[dict] = []
    with CallCache(cache_path) as cache:
        captions: dict[int, str] = {}
        if cfg.vision is not None:
            vision = make_backend(cfg.vision, cfg, dataset.items, sleep)
            # Caption only what a prompt will show: the items mined and those in the users' windows.
            shown = set(item_ids) if "items" in cfg.mine else set()
            if "users" in cfg.mine:
                train = dataset.train_sequences()
                shown.update(int(i) for u in user_ids for i in train[u][-cfg.user_history :])
            captions, failed = caption_items(dataset.items, vision, cache, cfg, image_root, sorted(shown), progress)
            failures += failed
            summary["captions"] = len(captions)
        if "items" in cfg.mine:
            result = mine_item_interests(dataset.items, backends, cache, cfg, embed_fn, captions, item_ids, progress)
            result.frame.to_parquet(out_dir / "item_interests.parquet", index=False)
            failures += result.failures
            summary["items"] = _coverage(result.frame, "item_id", len(item_ids))
        if "users" in cfg.mine:
            result = mine_user_interests(dataset, backends, cache, cfg, embed_fn, reviews, captions, user_ids, progress)
            result.frame.to_parquet(out_dir / "user_interests.parquet", index=False)
            failures += result.failures
            summary["users"] = _coverage(result.frame, "user_id", len(user_ids))
        summary["cache"] = cache.stats()
    summary["failures"] = dict(Counter(f"{f['kind']}:{f['backend']}:{f['reason']}" for f in failures))
    summary["seconds"] = round(time.time() - started, 2)
    write_json(out_dir / "failures.json", failures)
    write_json(out_dir / "mining.json", summary)
    stats = summary["cache"]
    log.info(
        "interests: %d calls made, %d answered from the cache, %d failures; %d prompt + %d completion tokens paid",
        stats["misses"],
        stats["hits"],
        len(failures),
        stats["prompt_tokens"],
        stats["completion_tokens"],
    )
    return {k: summary[k] for k in ("items", "users", "failures") if k in summary} | {
        "calls": stats["misses"],
        "cache_hits": stats["hits"],
    }


def _coverage(frame: pd.DataFrame, id_column: str, total: int) -> dict:
    with_any = int(frame[id_column].nunique())
    return {
        "total": total,
        "with_interests": with_any,
        "rows": len(frame),
        "mean_per_id": round(len(frame) / max(with_any, 1), 2),
    }


def run(ctx) -> dict:
    """The ``interests`` stage: reads ``prepare``, writes into ``ctx.out``; the call cache lives outside the run.

    The cache defaults to ``<run_dir>/../.cache/interests/calls.sqlite`` so that it survives
    the stage's temporary directory, a forced rerun, and is shared by sibling runs; relative
    image paths are read from ``data.path``.
    """
    cfg: InterestsConfig = ctx.cfg.interests
    prepared = ctx.input("prepare")
    dataset = Dataset.load(prepared, ctx.cfg.data.max_history)
    import pyarrow.parquet as pq

    reviews = None
    if "reviews" in pq.read_schema(prepared / "sequences.parquet").names:
        reviews = [list(r) for r in pd.read_parquet(prepared / "sequences.parquet", columns=["reviews"])["reviews"]]
    cache_path = cfg.cache_path or Path(ctx.run_dir).resolve().parent / ".cache" / "interests" / "calls.sqlite"
    return mine(dataset, cfg, ctx.out, cache_path, reviews=reviews, image_root=ctx.cfg.data.path or None)
