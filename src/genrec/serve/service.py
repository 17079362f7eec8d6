"""What the HTTP service serves: the item catalogue and a batched decoder over a trained run.

``RecommendService.decode`` is the batch function of the micro-batcher: it takes many
``Query`` objects and answers them with as few beam searches as it can. A query's beam
width depends on the query alone (``beam_width``), never on what it was batched with, so
a request gets the same items whether it was decoded alone or among 31 others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# Inference modes: mode -> what it does. A run serves those its model was trained for
# (``RecommendService.modes``).
MODES = {
    "direct": "trie-constrained beam search over the Semantic IDs",
    "reasoning": "a greedy rationale first (models trained with GREAM's gream_reason task), then the beam search",
    "agent": "DeepRec: the model calls the run's TRM over several turns, then ranks the candidates (agent_sft/agent_rl models)",
}


class InputError(ValueError):
    """A request names something that does not exist (answered with 422 and this message)."""


@dataclass(frozen=True)
class Query:
    history: tuple[int, ...]  # item_ids, oldest first
    k: int
    exclude_seen: bool
    mode: str = "direct"


@dataclass
class Answer:
    items: list[tuple[int, float]]  # (item_id, score), best first, at most k
    rationale: str | None = None  # the reasoning mode's rationale text
    transcript: dict | None = None  # the agent mode's turns, retrieved items and answer


class Catalogue:
    """Item ids, titles and SIDs; resolves titles to item ids."""

    def __init__(self, items: pd.DataFrame, sids: Sequence[str]):
        if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
            raise ValueError("items.item_id must be 0..N-1 in row order (a prepared items.parquet)")
        if len(sids) != len(items):
            raise ValueError(f"{len(sids)} SIDs for {len(items)} items: the model and the dataset disagree")
        self.titles = items["title"].fillna("").astype(str).tolist()
        self.sids = list(sids)
        # Descriptive text columns shown by /items, besides the title.
        self.attributes = {
            col: items[col].fillna("").astype(str).tolist() for col in ("brand", "categories") if col in items.columns
        }
        self._lower = [t.strip().lower() for t in self.titles]
        self._by_title: dict[str, list[int]] = {}
        for item_id, title in enumerate(self._lower):
            if title:
                self._by_title.setdefault(title, []).append(item_id)

    def __len__(self) -> int:
        return len(self.titles)

    def resolve(self, history: Sequence[int | str]) -> list[int]:
        """Item ids for a history of item ids (int) and exact titles (str, case-insensitive)."""
        out = []
        for pos, entry in enumerate(history):
            if isinstance(entry, int):
                if not 0 <= entry < len(self):
                    raise InputError(
                        f"history[{pos}]: item_id {entry} does not exist (item ids are 0..{len(self) - 1})"
                    )
                out.append(entry)
                continue
            found = self._by_title.get(entry.strip().lower(), [])
            if not found:
                raise InputError(
                    f"history[{pos}]: no item has the title {entry!r}; send an item_id or an exact title "
                    "(GET /items?q=... finds titles)"
                )
            if len(found) > 1:
                raise InputError(
                    f"history[{pos}]: the title {entry!r} names several items {found[:10]}; send an item_id"
                )
            out.append(found[0])
        return out

    def item(self, item_id: int) -> dict:
        if not 0 <= item_id < len(self):
            raise KeyError(f"item_id {item_id} does not exist (item ids are 0..{len(self) - 1})")
        return {
            "item_id": item_id,
            "title": self.titles[item_id],
            "sid": self.sids[item_id],
            "attributes": {col: values[item_id] for col, values in self.attributes.items()},
        }

    def search(self, text: str, limit: int) -> list[dict]:
        """Items whose title contains ``text`` (case-insensitive), in item_id order."""
        needle = text.strip().lower()
        hits = [i for i, title in enumerate(self._lower) if needle in title][:limit]
        return [self.item(i) for i in hits]


class RecommendService:
    """A trained recommender behind a catalogue; ``decode`` runs in the batch thread only."""

    def __init__(
        self,
        recommender,
        catalogue: Catalogue,
        model_name: str,
        num_beams: int = 20,
        max_think_tokens: int = 48,
        retriever=None,
        agent_cfg=None,
    ):
        if recommender.num_items != len(catalogue):
            raise ValueError(f"the model knows {recommender.num_items} items but the catalogue has {len(catalogue)}")
        self.recommender, self.catalogue, self.model_name = recommender, catalogue, model_name
        self.num_beams, self.max_think_tokens = num_beams, max_think_tokens
        self.modes = ["direct"] + (["reasoning"] if _has_reasoning(recommender) else [])
        # The agent mode needs a model trained with the deeprec task and the run's TRM.
        self.retriever, self.agent_cfg = retriever, agent_cfg
        if retriever is not None and _has_agent(recommender):
            from genrec.agent.loop import AgentFormat

            self.agent_fmt = AgentFormat(recommender, catalogue.titles, agent_cfg)
            self.modes.append("agent")

    def beam_width(self, query: Query) -> int:
        """num_beams, doubled until the beams hold k items after dropping the excluded seen ones."""
        need = query.k + (len(set(query.history)) if query.exclude_seen else 0)
        width = self.num_beams
        while width < need:
            width *= 2
        return width

    def decode(self, queries: Sequence[Query]) -> list[Answer]:
        """Per query, up to k items, best first; one decode per (mode, beam width) in the batch.

        Grouping by width also groups by history length when seen items are excluded (a long
        history needs wide beams), so little of a batch's compute goes to left-padding.
        """
        groups: dict[tuple[str, int], list[int]] = {}
        for i, q in enumerate(queries):
            if q.mode not in self.modes:
                raise ValueError(f"inference mode {q.mode!r} is not served by this run; it serves {self.modes}")
            groups.setdefault((q.mode, self.beam_width(q)), []).append(i)
        answers: list[Answer] = [Answer([]) for _ in queries]
        for (mode, width), rows in groups.items():
            histories = [list(queries[i].history) for i in rows]
            rationales: list[str | None] = [None] * len(rows)
            transcripts: list[dict | None] = [None] * len(rows)
            if mode == "reasoning":
                from genrec.methods.gream.reasoning import reasoning_recommend

                out, rationales = reasoning_recommend(
                    self.recommender, histories, k=width, max_think_tokens=self.max_think_tokens, num_beams=width
                )
            elif mode == "agent":
                out, transcripts = self._agent(histories, width, [queries[i].exclude_seen for i in rows])
            else:
                out = self.recommender.recommend(histories, num_beams=width, k=width)
            items, scores = out.items.cpu().tolist(), out.scores.cpu().tolist()  # (B, width) each
            for row, i in enumerate(rows):
                q = queries[i]
                seen = set(q.history) if q.exclude_seen else set()
                ranked = [(it, sc) for it, sc in zip(items[row], scores[row]) if it >= 0 and it not in seen]
                answers[i] = Answer(ranked[: q.k], rationales[row], transcripts[row])
        return answers

    def _agent(self, histories: list[list[int]], width: int, exclude_seen: Sequence[bool]):
        """The agent mode as a BeamOutput-like (items, scores) pair, and each transcript.

        The TRM never returns the history's items where the query excludes seen items; where
        it does not, it may.
        """
        from types import SimpleNamespace

        import torch

        from genrec.agent.loop import run_agent

        hist = [np.asarray(h, dtype=np.int64) for h in histories]
        seen = [h if ex else h[:0] for h, ex in zip(hist, exclude_seen)]
        out = run_agent(self.recommender, self.retriever, self.agent_fmt, hist, seen, self.agent_cfg, width)
        items = torch.as_tensor(out.ranked)
        # Rank scores (the agent's list is an order, not a likelihood over all items): 0, -1, -2, ...
        scores = -torch.arange(width, dtype=torch.float32).expand(len(hist), -1).clone()
        return SimpleNamespace(items=items, scores=scores), [t.to_json(self.catalogue.titles) for t in out.transcripts]

    def warm_up(self) -> None:
        """One decode per mode, so the first request does not pay for lazy initialisation."""
        self.decode([Query((0,), 1, False, mode) for mode in self.modes])


def _has_agent(recommender) -> bool:
    from genrec.agent.protocol import AGENT_TASK

    return AGENT_TASK in recommender.fmt.heads


def _has_reasoning(recommender) -> bool:
    from genrec.methods.gream.tasks import REASON_TASK

    return REASON_TASK in recommender.fmt.heads


def model_dir_for(run_dir: Path, model: str) -> tuple[str, Path]:
    """(name, directory) of the run's model: a model stage's name, or "auto" (the first trained of
    rl, sft, agent_rl, agent_sft, gream_rl, gream_sft)."""
    if model == "auto":
        trained = [m for m in MODEL_STAGES if (run_dir / m / "model" / "genrec.json").is_file()]
        model = trained[0] if trained else "sft"
    path = run_dir / model / "model"
    if not (path / "genrec.json").is_file():
        raise FileNotFoundError(f"{path} holds no trained model: run the '{model}' stage of {run_dir} first")
    return model, path


MODEL_STAGES = ("rl", "sft", "agent_rl", "agent_sft", "gream_rl", "gream_sft")


def load_service(
    run_dir: str | Path, model: str = "auto", device: str = "", num_beams: int = 20, max_think_tokens: int = 48
) -> RecommendService:
    """The catalogue (``prepare/items.parquet``) and the run's trained model, checked against each other."""
    from genrec.model.recommender import GenerativeRecommender

    run_dir = Path(run_dir)
    items_path = run_dir / "prepare" / "items.parquet"
    if not items_path.is_file():
        raise FileNotFoundError(f"{items_path} is missing: {run_dir} is not a prepared genrec run directory")
    name, path = model_dir_for(run_dir, model)
    recommender = GenerativeRecommender.load(path, device=device or None)
    items = pd.read_parquet(items_path)
    if len(items) != recommender.num_items:
        raise ValueError(f"{path} was trained on {recommender.num_items} items but {items_path} has {len(items)}")
    sids = [recommender.vocab.sid_string(codes) for codes in recommender.codes]
    retriever = agent_cfg = None
    if _has_agent(recommender) and (run_dir / "trm" / "done.json").is_file():
        from genrec.agent.config import AgentConfig
        from genrec.agent.trm import Retriever
        from genrec.io import read_json

        retriever = Retriever.load(run_dir, device)
        section = read_json(run_dir / name / "done.json")["config"].get("agent", {})
        agent_cfg = AgentConfig(**section)
    return RecommendService(
        recommender, Catalogue(items, sids), name, num_beams, max_think_tokens, retriever, agent_cfg
    )
