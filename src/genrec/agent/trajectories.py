"""Warm-up trajectories for DeepRec's supervised stage, made with the TRM from the training data.

One trajectory per chosen target position of a user's TRAINING sequence (the positions GREAM's
chains use, ``chain_positions``), so no valid or test item is ever in a history, a call's
candidates or an answer. Each has two calls, written from the items' category labels the
way GREAM's data-derived chains reason (``genrec.methods.gream.chains``):

1. ``evidence: Drama 7, Comedy 4.`` then ``<pref> Drama; Comedy </pref>``: the history's
   recency-weighted top labels;
2. ``intent: Romance.`` then ``<pref> Romance </pref>``: the target's label that the history
   ranks highest (a hindsight call: the expert sees the target, as GREAM's teacher does, and
   the model learns to guess it from the history). Skipped when the target has no label.

The TRM answers each call with ``agent.retrieve_n`` candidates (seen items and earlier
candidates excluded), exactly as at inference. The answer is the target, then the other
candidates in TRM order, ``agent.answer_items`` items in all; the loss is on everything the
LLM writes (reasoning, calls, closing tag, answer) and never on the tool's lists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genrec.agent.config import AgentConfig
from genrec.agent.protocol import AGENT_TASK, ITEMS, ITEMS_END, PREF, PREF_END, THINK, THINK_END, item_names
from genrec.methods.gream.chains import chain_positions, intent_label, item_labels, label_scores, top_labels
from genrec.model.prompt import PromptFormat
from genrec.tasks.base import Example, TaskData

log = logging.getLogger("genrec")


@dataclass
class Trajectory:
    user: int
    position: int  # the target's index in the user's training sequence
    history: np.ndarray  # (h,) the last max_history training items before the target
    target: int
    reasoning: list[str]  # one text per call
    preferences: list[str]  # one preference per call
    retrieved: list[np.ndarray]  # the TRM's answer to each call
    answer: np.ndarray  # (m,) the ranked answer, target first


def expert_calls(history: Sequence[int], target: int, labels: Sequence[tuple[str, ...]], cfg: AgentConfig):
    """The (reasoning, preference) of each call of one trajectory (see the module docstring).

    >>> labels = [("Drama",), ("Drama", "War"), ("Comedy",), ("Romance",)]
    >>> expert_calls([0, 1, 2], 3, labels, AgentConfig())
    [('evidence: Drama 2, Comedy 1, War 1.', 'Comedy; Drama'), ('intent: Romance.', 'Romance')]
    """
    counts, recency = label_scores(history, labels)
    evidence = top_labels(dict(counts), cfg.evidence_labels)
    preference = top_labels(recency, cfg.preference_labels)
    calls = [
        (
            "evidence: " + (", ".join(f"{label} {counts[label]}" for label in evidence) or "none") + ".",
            "; ".join(preference) or "anything",
        )
    ]
    intent = intent_label(labels[target], recency)
    if intent:
        calls.append((f"intent: {intent[0]}.", intent[0]))
    return calls


def build_trajectories(
    train_sequences: Sequence[np.ndarray], categories: Sequence[str], retriever, cfg: AgentConfig, max_history: int
) -> list[Trajectory]:
    """Trajectories for the training positions, the TRM called in batches of 512."""
    labels = item_labels(categories, cfg.max_label_share)
    rows = chain_positions(train_sequences, cfg.trajectories_per_user, cfg.min_history)
    trajs = []
    for user, p in rows:
        seq = train_sequences[user]
        history = seq[max(0, p - max_history) : p]
        calls = expert_calls(history, int(seq[p]), labels, cfg)
        trajs.append(
            Trajectory(int(user), int(p), history, int(seq[p]), [c[0] for c in calls], [c[1] for c in calls], [], None)
        )
    for start in range(0, len(trajs), 512):
        chunk = trajs[start : start + 512]
        # Every item before the target is excluded (the history may be cut at max_history).
        excluded = [list(train_sequences[t.user][: t.position]) for t in chunk]
        for call in range(2):
            todo = [j for j, t in enumerate(chunk) if call < len(t.preferences)]
            if not todo:
                continue
            items, _ = retriever.retrieve(
                [chunk[j].history for j in todo],
                [chunk[j].preferences[call] for j in todo],
                min(cfg.retrieve_n, retriever.num_items),
                exclude=[np.asarray(excluded[j], dtype=np.int64) for j in todo],
            )
            for j, row in zip(todo, items):
                row = row[row >= 0]
                chunk[j].retrieved.append(row)
                excluded[j] += row.tolist()
    for t in trajs:
        others = [int(i) for call in t.retrieved for i in call if i != t.target]
        t.answer = np.asarray([t.target, *dict.fromkeys(others)][: cfg.answer_items], dtype=np.int64)
    return trajs


class AgentTask:
    """The ``deeprec`` SFT task: one example per trajectory, loss on the LLM's tokens only."""

    name = AGENT_TASK

    def __init__(self, data: TaskData, fmt: PromptFormat, trajectories: Sequence[Trajectory], cfg: AgentConfig):
        self.data, self.fmt, self.trajs = data, fmt, list(trajectories)
        tok = data.tokenizer

        def enc(text: str) -> list[int]:
            return list(tok(text, add_special_tokens=False)["input_ids"])

        self.head = fmt.head(AGENT_TASK)
        self.think, self.think_end = enc(THINK), enc(THINK_END)
        self.pref, self.pref_end = enc(PREF), enc(PREF_END)
        self.items, self.items_end = enc(ITEMS), enc(ITEMS_END)
        self.names = item_names(tok, data.titles, cfg.title_tokens)
        texts = [" " + r for t in self.trajs for r in t.reasoning] + [
            " " + p for t in self.trajs for p in t.preferences
        ]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        cap = data.max_text_tokens
        self.text_ids = {text: list(row[:cap]) for text, row in zip(texts, ids)}
        self.lengths = np.asarray([len(self._ids(m)[0]) for m in range(len(self.trajs))], dtype=np.int64)
        # A turn longer than the inference budget can never be written whole: every such turn
        # would end malformed at evaluation.
        longest = (
            max(
                (len(self.text_ids[" " + r]) + len(self.pref) + len(self.text_ids[" " + p]) + len(self.pref_end))
                for t in self.trajs
                for r, p in zip(t.reasoning, t.preferences)
            )
            if self.trajs
            else 0
        )
        if longest > cfg.turn_tokens:
            log.warning(
                "deeprec: the longest warm-up turn is %d tokens but agent.turn_tokens is %d: raise it, or the "
                "model cannot finish such turns at inference",
                longest,
                cfg.turn_tokens,
            )

    def _ids(self, m: int) -> tuple[list[int], list[bool]]:
        """The trajectory's ids and, per id, whether it takes loss (the LLM wrote it)."""
        t, sid = self.trajs[m], self.data.sid_ids
        ids = self.head + sid[t.history].reshape(-1).tolist() + self.think
        loss = [False] * len(ids)

        def add(part: Sequence[int], by_model: bool) -> None:
            ids.extend(part)
            loss.extend([by_model] * len(part))

        for reasoning, pref, items in zip(t.reasoning, t.preferences, t.retrieved):
            add(self.text_ids[" " + reasoning] + self.pref + self.text_ids[" " + pref] + self.pref_end, True)
            tool = list(self.items)
            for j, item in enumerate(items):
                tool += sid[item].tolist() + self.names[item]
                if j + 1 < len(items):
                    tool += self.fmt.sep
            add(tool + self.items_end, False)
        add(self.think_end, True)
        add(self.fmt.answer, False)
        add(sid[t.answer].reshape(-1).tolist() + [self.fmt.eos_id], True)
        return ids, loss

    def __len__(self) -> int:
        return len(self.trajs)

    def __getitem__(self, i: int) -> Example:
        ids, loss = self._ids(i)
        ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(loss), ids, -100)
        return Example(ids, labels, self.trajs[i].user)


def agent_builders(trajectories: Sequence[Trajectory], cfg: AgentConfig) -> dict:
    """Task builders for ``train_sft(..., extra_tasks=...)``."""
    return {AGENT_TASK: lambda data, fmt: AgentTask(data, fmt, trajectories, cfg)}
