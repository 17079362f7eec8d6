"""GREAM's reasoning chains: evidence, preferences, intent, a denoised rewrite of the history, the answer.

One chain per chosen target position of a user's TRAINING sequence (``Dataset.train_sequences``),
so no valid or test item is ever a history item, a rewrite item or an answer of a chain.

Data-derived chains (no teacher LLM) are built from the items' category labels, the history
and the training target, as GREAM's teacher sees the target but reasons as if it did not:

- evidence: the ``evidence_labels`` most frequent labels of the history, with their counts;
- preferences: the ``preference_labels`` labels of highest recency-weighted count (item j of
  n counts (j + 1) / n), the user's current taste rather than the whole history;
- intent: the target's label that the preferences rank highest (any label of the target when
  none of its labels occurs in the history; "any" when the target has no label);
- rewrite: the history with the items that fit neither the preferences nor the intent removed
  (a real denoising: GREAM's public code copies the history), the last ``rewrite_items`` kept.
  Items without any label cannot be judged and are kept.

With a teacher LLM (``gream.teacher``), the three reasoning steps are its words instead, asked
once per chain through the interests call cache; an answer that does not hold the three
steps leaves that chain data-derived, and the count is reported. The rewrite and the answer
stay data-derived: they must be SIDs of real items.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genrec.methods.gream.config import GREAMConfig

log = logging.getLogger("genrec")

STEPS = ("evidence", "preferences", "intent")


@dataclass
class Chain:
    user: int
    position: int  # index of the target in the user's training sequence
    history: np.ndarray  # (h,) the last max_history training items before the target
    target: int
    evidence: str  # each step's text, starting with its name: "evidence: Drama 7, Comedy 4."
    preferences: str
    intent: str
    rewrite: np.ndarray  # (r,) the denoised history, oldest first
    source: str  # "data", or the teacher backend's name


def item_labels(categories: Sequence[str], max_share: float) -> list[tuple[str, ...]]:
    """Each item's informative category labels: comma-separated, stripped, minus those on > max_share of items.

    >>> item_labels(["Beauty, Skin", "Beauty, Hair", "Beauty"], 0.5)
    [('Skin',), ('Hair',), ()]
    """
    split = [tuple(dict.fromkeys(c.strip() for c in str(cats).split(",") if c.strip())) for cats in categories]
    counts = Counter(label for labels in split for label in labels)
    common = {label for label, n in counts.items() if n > max_share * len(split)}
    return [tuple(label for label in labels if label not in common) for labels in split]


def chain_positions(train_sequences: Sequence[np.ndarray], chains_per_user: int, min_history: int) -> np.ndarray:
    """Rows ``(user, position)`` (P, 2): the last ``chains_per_user`` positions (0 = all) with >= min_history before.

    >>> chain_positions([np.arange(7), np.arange(3)], 2, 4).tolist()
    [[0, 5], [0, 6]]
    """
    rows = []
    for user, seq in enumerate(train_sequences):
        first = min_history if chains_per_user == 0 else max(min_history, len(seq) - chains_per_user)
        rows += [(user, p) for p in range(first, len(seq))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def top_labels(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` labels of highest score; ties by name, so nothing depends on dict order."""
    return [label for label, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def label_scores(history: Sequence[int], labels: Sequence[tuple[str, ...]]) -> tuple[Counter, dict[str, float]]:
    """(count, recency-weighted count) of each label over the history; item j of n counts (j + 1) / n.

    >>> label_scores([0, 1], [("Drama",), ("Drama", "War")])
    (Counter({'Drama': 2, 'War': 1}), {'Drama': 1.5, 'War': 1.0})
    """
    n = len(history)
    counts: Counter = Counter()
    recency: dict[str, float] = {}
    for j, item in enumerate(history):
        for label in labels[item]:
            counts[label] += 1
            recency[label] = recency.get(label, 0.0) + (j + 1) / n
    return counts, recency


def intent_label(target_labels: Sequence[str], recency: dict[str, float]) -> list[str]:
    """The target's label that the history's recency ranks highest; its first label when none occurs; [] if none."""
    known = {label: recency[label] for label in target_labels if label in recency}
    return top_labels(known, 1) if known else list(target_labels[:1])


def data_chain(
    user: int, position: int, history: np.ndarray, target: int, labels: Sequence[tuple[str, ...]], cfg: GREAMConfig
) -> Chain:
    """The data-derived chain of one target (see the module docstring).

    >>> labels = [("Drama",), ("Drama",), ("Horror",), ("Comedy",), ("Drama", "Comedy")]
    >>> c = data_chain(0, 4, np.array([0, 2, 1, 3]), 4, labels, GREAMConfig(preference_labels=1))
    >>> c.evidence, c.preferences, c.intent, c.rewrite.tolist()
    ('evidence: Drama 2, Comedy 1, Horror 1.', 'preferences: Comedy.', 'intent: Comedy.', [3])
    """
    counts, recency = label_scores(history, labels)
    evidence = top_labels(dict(counts), cfg.evidence_labels)
    preferences = top_labels(recency, cfg.preference_labels)
    intent = intent_label(labels[target], recency)
    fits = set(preferences) | set(intent)
    kept = [item for item in history if not labels[item] or fits & set(labels[item])] if fits else list(history)
    return Chain(
        user=user,
        position=position,
        history=np.asarray(history, dtype=np.int64),
        target=int(target),
        evidence="evidence: " + (", ".join(f"{label} {counts[label]}" for label in evidence) or "none") + ".",
        preferences="preferences: " + (", ".join(preferences) or "none") + ".",
        intent="intent: " + (intent[0] if intent else "any") + ".",
        rewrite=np.asarray(kept[-cfg.rewrite_items :], dtype=np.int64),
        source="data",
    )


def build_chains(
    train_sequences: Sequence[np.ndarray], categories: Sequence[str], cfg: GREAMConfig, max_history: int
) -> list[Chain]:
    """Data-derived chains for the positions of :func:`chain_positions` (training items only)."""
    labels = item_labels(categories, cfg.max_label_share)
    if not any(labels):
        raise ValueError(
            "data-derived GREAM chains need item categories, but no item has an informative one (items.parquet "
            "column 'categories'): raise gream.max_label_share, configure gream.teacher, or drop gream_reason "
            "from sft.tasks"
        )
    chains = []
    for user, p in chain_positions(train_sequences, cfg.chains_per_user, cfg.min_history):
        seq = train_sequences[user]
        chains.append(data_chain(int(user), int(p), seq[max(0, p - max_history) : p], int(seq[p]), labels, cfg))
    return chains


# --------------------------------------------------------------------------- teacher LLM

TEACHER_SYSTEM = (
    "You are a recommendation analyst. You see the items a user interacted with, in order, and the item "
    "they chose next. Explain the choice as if you did NOT know it: reason only from the history."
)


def teacher_messages(chain: Chain, titles: Sequence[str], categories: Sequence[str]) -> list[dict]:
    """The chat messages asking a teacher for the three steps of one chain."""

    def name(item: int) -> str:
        cats = str(categories[item]).strip()
        return f"{titles[item].strip() or 'untitled'}" + (f" ({cats})" if cats else "")

    history = "\n".join(f"{j + 1}. {name(int(i))}" for j, i in enumerate(chain.history))
    user = (
        f"History, oldest first:\n{history}\n\nThe next item was: {name(chain.target)}\n\n"
        "Answer in exactly three lines, each under 25 words, without naming the next item:\n"
        "evidence: <what the history shows>\npreferences: <the user's lasting preferences>\n"
        "intent: <what the user is looking for now>"
    )
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": user}]


def parse_teacher(text: str) -> dict[str, str] | None:
    """The three steps of a teacher answer, each as ``"<step>: <text>"``, or None when one is missing or empty.

    >>> parse_teacher("Evidence: likes dramas\\npreferences: drama\\n- intent: a new drama")["intent"]
    'intent: a new drama'
    >>> parse_teacher("I cannot help with that.") is None
    True
    """
    steps = {}
    for line in text.splitlines():
        m = re.match(r"^\W*(evidence|preferences|intent)\W*:\s*(.+?)\s*$", line.strip(), flags=re.IGNORECASE)
        if m and m.group(1).lower() not in steps:
            steps[m.group(1).lower()] = f"{m.group(1).lower()}: {m.group(2)}"
    return steps if all(s in steps for s in STEPS) else None


def apply_teacher(
    chains: list[Chain], backend, cache, titles: Sequence[str], categories: Sequence[str], max_chains: int = 0
) -> dict[str, int]:
    """Replace the three steps of (the first ``max_chains``, 0 = all) chains by the teacher's, in place.

    ``backend`` is a ``genrec.interests.backends.ChatBackend``, ``cache`` a ``CallCache``: an answer
    asked before is read back, never paid twice. Returns counts: asked, taught, malformed, failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    from genrec.interests.backends import CallFailed
    from genrec.interests.cache import call_key

    todo = chains if max_chains == 0 else chains[:max_chains]

    def ask(chain: Chain):
        messages = teacher_messages(chain, titles, categories)
        key = call_key(backend.name, backend.model, messages, backend.params)
        try:
            result = cache.fetch(key, backend.name, backend.model, lambda: backend.complete(messages))
        except CallFailed as exc:
            cache.record_failure(key, backend.name, backend.model, exc.reason, str(exc))
            return "failed"
        return parse_teacher(result.text) or "malformed"

    counts = {"asked": len(todo), "taught": 0, "malformed": 0, "failed": 0}
    with ThreadPoolExecutor(max_workers=max(1, backend.max_concurrency)) as pool:
        for chain, steps in zip(todo, pool.map(ask, todo)):
            if isinstance(steps, str):
                counts[steps] += 1
                continue
            chain.evidence, chain.preferences, chain.intent = (steps[s] for s in STEPS)
            chain.source = backend.name
            counts["taught"] += 1
    if counts["malformed"] or counts["failed"]:
        log.warning(
            "gream teacher: %d of %d chains stay data-derived (%d malformed answers, %d failed calls)",
            counts["malformed"] + counts["failed"],
            counts["asked"],
            counts["malformed"],
            counts["failed"],
        )
    return counts
