"""DeepRec's multi-turn protocol: the tags, what a turn may say, and how the tool answers.

One trajectory, as token ids (``head`` is the ``deeprec`` task's, ``sid(i)`` an item's SID tokens)::

    head sid(h_1) ... sid(h_k) <think>
      reasoning <pref> phrase; phrase </pref>            <- the LLM: reasoning and a tool call
      <items> sid(c_1) title_1 <sep> ... </items>       <- the tool: the TRM's candidates
      reasoning <pref> ... </pref> <items> ... </items>  <- up to agent.max_turns calls
    </think> <answer> sid(r_1) ... sid(r_m) <eos>        <- the LLM: the ranked answer

DeepRec's tags are ``<|begin_of_preference|>`` / ``<|end_of_preference|>`` around the call,
``<|begin_of_item_list|>`` / ``<|end_of_item_list|>`` around the tool's list, and a
``<recommendation_list>`` of ten titles. genrec uses short tags (one special token each in
the scratch tokenizer, registered in ``genrec.model.prompt.TASK_TOKENS``) and answers with
SIDs, so that the answer can be ranked over the retrieved candidates and is always an item.

A turn is the text the LLM writes until it closes a call (``</pref>``) or the reasoning
(``</think>``). :func:`parse_turn` reads it; a turn that is neither a well-formed call nor a
close (no ``<pref>`` opener, an empty preference, eos, the budget) is answered with an
error message in the tool's tags and counted as a format violation. Nothing a model writes
can crash a rollout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from genrec.model.prompt import INSTRUCTIONS, TASK_TOKENS

AGENT_TASK = "deeprec"
THINK, THINK_END = "<think>", "</think>"
PREF, PREF_END = "<pref>", "</pref>"
ITEMS, ITEMS_END = "<items>", "</items>"
TAGS = (THINK, THINK_END, PREF, PREF_END, ITEMS, ITEMS_END)
TASK_TOKENS[AGENT_TASK] = TAGS
INSTRUCTIONS.setdefault(
    AGENT_TASK,
    "Here is the history of items a user interacted with, in order. Think about the user's preferences, "
    "call the recommender with <pref> preference </pref> to retrieve candidates, and answer with the next item:",
)

# What a turn was, as parse_turn reads it.
CALL, CLOSE, MALFORMED = "call", "close", "malformed"


@dataclass
class Turn:
    kind: str  # CALL, CLOSE or MALFORMED
    reasoning: str  # the text before the call (or all of it)
    preference: str = ""  # the call's preference text (CALL only)
    error: str = ""  # why the turn is MALFORMED


@dataclass
class Transcript:
    """What one user's trajectory did, for the rewards, the user and the evaluation."""

    turns: list[Turn] = field(default_factory=list)
    retrieved: list[list[int]] = field(default_factory=list)  # item_ids of each valid call, TRM order
    answer: list[int] = field(default_factory=list)  # the final ranking, best first
    closed: bool = False  # the model closed its reasoning itself (not forced)

    @property
    def calls(self) -> list[Turn]:
        return [t for t in self.turns if t.kind == CALL]

    @property
    def malformed(self) -> int:
        return sum(t.kind == MALFORMED for t in self.turns)

    def candidates(self) -> list[int]:
        """Every retrieved item once, in the order first seen."""
        return list(dict.fromkeys(i for call in self.retrieved for i in call))

    def to_json(self, titles: Sequence[str] | None = None) -> dict:
        name = (lambda i: titles[i]) if titles is not None else (lambda i: i)
        return {
            "turns": [
                {k: v for k, v in vars(t).items() if v != ""} | {"kind": t.kind, "reasoning": t.reasoning}
                for t in self.turns
            ],
            "retrieved": [[name(i) for i in call] for call in self.retrieved],
            "answer": [name(i) for i in self.answer],
            "closed": self.closed,
        }


def item_names(tokenizer, titles: Sequence[str], title_tokens: int) -> list[list[int]]:
    """How each item is named in a tool answer: its title's first ``title_tokens`` tokens."""
    ids = tokenizer([" " + t.strip() for t in titles], add_special_tokens=False)["input_ids"] if titles else []
    return [list(row[:title_tokens]) for row in ids]


def parse_turn(text: str, stop: str) -> Turn:
    """Read one turn: the generated ``text`` (without its stop tag) and which tag stopped it.

    ``stop`` is ``PREF_END``, ``THINK_END``, or "" when eos or the budget ended the turn.

    >>> parse_turn("likes drama <pref> Drama; Romance ", PREF_END)
    Turn(kind='call', reasoning='likes drama', preference='Drama; Romance', error='')
    >>> parse_turn("done", THINK_END).kind, parse_turn("<pref>  ", PREF_END).error
    ('close', 'empty preference')
    >>> parse_turn("rambling", "").error
    'the turn ended without </pref> or </think>'
    """
    if stop == THINK_END:
        return Turn(CLOSE, text.strip())
    if stop != PREF_END:
        return Turn(MALFORMED, text.strip(), error=f"the turn ended without {PREF_END} or {THINK_END}")
    head, sep, pref = text.rpartition(PREF)
    if not sep:
        return Turn(MALFORMED, text.strip(), error=f"{PREF_END} without {PREF}")
    if not re.sub(r"[\s;,.]", "", pref):
        return Turn(MALFORMED, head.strip(), error="empty preference")
    return Turn(CALL, head.strip(), preference=pref.strip())
