"""A persistent cache of LLM calls (SQLite, WAL), so no call is ever paid for twice.

The key is the SHA-256 of the backend's name, the model and the canonical JSON of the
messages and sampling parameters. A row holds the answer text and its token counts;
never the API key, and not the prompt either (only its hash), so the file can be shared.
Each answer is committed as soon as it arrives: a killed run loses at most the calls in
flight, and the rerun finds everything else here. This is how mining resumes.

Two threads asking the same question at once (two items with identical metadata make
identical prompts) share one call: the second waits for the first's answer.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genrec.interests.backends import ChatResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    created REAL NOT NULL
);
"""

COUNTERS = (
    "hits",
    "misses",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "saved_prompt_tokens",
    "saved_completion_tokens",
)


def call_key(backend: str, model: str, messages: list[dict], params: dict[str, Any]) -> str:
    """SHA-256 of the backend name, model and canonical JSON of messages and parameters."""
    blob = json.dumps(
        {"backend": backend, "model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    """Thread-safe SQLite store of answers, with this session's hit/miss/failure and token counts.

    ``stats()`` counts this session only: ``hits`` (answered from the file), ``misses``
    (backend called), ``failures`` (calls given up after retries), tokens paid
    (``prompt_tokens``, ``completion_tokens``) and tokens a hit saved (``saved_*``), in
    total and per backend.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed answer survives a killed process (not a power cut,
            # which may lose the last few; they would be asked again, nothing worse).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"{self.path}: not a usable call cache ({exc}); move it away or set interests.cache_path"
            ) from exc
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))

    def get(self, key: str) -> ChatResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, prompt_tokens, completion_tokens FROM calls WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else ChatResult(row[0], row[1], row[2])

    def put(self, key: str, backend: str, model: str, result: ChatResult) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, backend, model, result.text, result.prompt_tokens, result.completion_tokens, time.time()),
            )

    def fetch(self, key: str, backend: str, model: str, call: Callable[[], ChatResult]) -> ChatResult:
        """The cached answer for ``key``, or ``call()``'s, stored before it is returned.

        Only one thread calls for a given key; others asking meanwhile wait and read its
        answer (or, if it raised, one of them calls in turn).
        """
        while True:
            cached = self.get(key)
            with self._lock:
                if cached is not None:
                    self._count(
                        backend,
                        hits=1,
                        saved_prompt_tokens=cached.prompt_tokens,
                        saved_completion_tokens=cached.completion_tokens,
                    )
                    return cached
                waiting = self._inflight.get(key)
                if waiting is None:
                    done = self._inflight[key] = threading.Event()
                    self._count(backend, misses=1)
            if waiting is not None:
                waiting.wait()
                continue
            try:
                result = call()
                self.put(key, backend, model, result)
                with self._lock:
                    self._count(backend, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
                return result
            finally:
                with self._lock:
                    del self._inflight[key]
                done.set()

    def record_failure(self, key: str, backend: str, model: str, reason: str, detail: str) -> None:
        """Keep a call given up after its retries (the answer, if any, stays cached)."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO failures (key, backend, model, reason, detail, created) VALUES (?, ?, ?, ?, ?, ?)",
                (key, backend, model, reason, detail[:500], time.time()),
            )
            self._count(backend, failures=1)

    def _count(self, backend: str, **deltas: int) -> None:
        for name, delta in deltas.items():
            self._counts[backend][name] += delta

    def stats(self) -> dict[str, Any]:
        """This session's counters, in total and under ``per_backend``."""
        with self._lock:
            per_backend = {b: dict(c) for b, c in sorted(self._counts.items())}
            total = {name: sum(c[name] for c in per_backend.values()) for name in COUNTERS}
            (entries,) = self._db.execute("SELECT COUNT(*) FROM calls").fetchone()
        return {**total, "entries": entries, "per_backend": per_backend}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
