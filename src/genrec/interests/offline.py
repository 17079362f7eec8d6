"""The offline miner: interests from item metadata alone, no LLM, named "offline-metadata".

What it finds is what the catalogue states, not inferred motivation: the deepest two
category path segments (never one most of the catalogue shares, such as the root
"Beauty"), the brand, and the title's most salient words and word pairs by tf-idf over
all titles and descriptions. Each interest says which of these it came from. A user's interests are
those of their training items, scored by how many of the items share them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from genrec.interests.schema import Interest, normalize

CATEGORY_SEPARATORS = re.compile(r"\s*[,>|]\s*")


@dataclass(frozen=True)
class _Found:
    interest: Interest
    source: str  # "category", "brand" or "keyword"


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


class OfflineMiner:
    """Metadata interests per item (computed once for the whole catalogue) and per user."""

    model = "metadata-tfidf"
    max_concurrency = 1

    def __init__(
        self,
        items: pd.DataFrame,
        name: str = "offline-metadata",
        max_interests: int = 5,
        max_category_share: float = 0.5,
        category_segments: int = 2,
        keywords_per_item: int = 3,
    ):
        self.name = name
        self.max_interests = max_interests
        n = len(items)
        col = {
            c: [_text(v) for v in items[c]] if c in items.columns else [""] * n
            for c in ("title", "brand", "categories", "description")
        }
        paths = [[s for s in CATEGORY_SEPARATORS.split(c) if normalize(s)] for c in col["categories"]]
        cat_df = Counter(normalize(s) for path in paths for s in set(path))
        brand_df = Counter(normalize(b) for b in col["brand"] if normalize(b))
        keywords = _tfidf_keywords([f"{t} {d}" for t, d in zip(col["title"], col["description"])], keywords_per_item)
        self._found: list[list[_Found]] = []
        for i in range(n):
            found: list[_Found] = []
            path = paths[i]
            # The deepest segments are the most specific; shallow ones (Beauty > Makeup) say
            # little about one item, and most of the catalogue shares the root.
            kept = [
                (depth, segment)
                for depth, segment in enumerate(path, start=1)
                if cat_df[normalize(segment)] / n <= max_category_share
            ][-category_segments:]
            for depth, segment in kept:
                share = cat_df[normalize(segment)] / n
                why = (
                    f"category path segment {depth} of {len(path)} ({' > '.join(path)}); "
                    f"{share:.1%} of the catalogue shares it"
                )
                found.append(_Found(Interest(segment, why, round(0.4 + 0.5 * (1 - share), 3)), "category"))
            brand = col["brand"][i]
            if normalize(brand):
                share = brand_df[normalize(brand)] / n
                why = f"the item's brand; {brand_df[normalize(brand)]} catalogue items share it"
                found.append(_Found(Interest(f"{brand} products", why, round(0.5 + 0.3 * (1 - share), 3)), "brand"))
            # A keyword whose words all appear in an earlier interest adds nothing.
            taken = {w for f in found for w in normalize(f.interest.interest).split()}
            for term, weight in keywords[i]:
                if set(term.split()) <= taken:
                    continue
                why = f"salient {'phrase' if ' ' in term else 'word'} of the title/description (tf-idf {weight:.2f})"
                found.append(_Found(Interest(term, why, round(0.3 + 0.5 * weight, 3)), "keyword"))
                taken |= set(term.split())
            found.sort(key=lambda f: -f.interest.confidence)
            self._found.append(found)

    def item_interests(self, item_id: int) -> list[Interest]:
        return [f.interest for f in self._found[item_id][: self.max_interests]]

    def user_interests(self, history: Sequence[int]) -> list[Interest]:
        """Interests of the items in ``history`` (training items only), by share of items x mean confidence."""
        if len(history) == 0:
            return []
        groups: dict[str, list[_Found]] = defaultdict(list)
        for item_id in history:
            for f in self._found[int(item_id)]:
                groups[normalize(f.interest.interest)].append(f)
        scored = []
        for members in groups.values():
            share = len(members) / len(history)
            mean_conf = float(np.mean([f.interest.confidence for f in members]))
            why = f"{members[0].source} interest of {len(members)} of the user's {len(history)} training items"
            scored.append(Interest(members[0].interest.interest, why, round(share * mean_conf, 3)))
        scored.sort(key=lambda x: (-x.confidence, x.interest))
        return scored[: self.max_interests]


def _tfidf_keywords(texts: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` highest tf-idf words and word pairs of each text (letters only, English stop words out)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(
        ngram_range=(1, 2),
        stop_words="english",
        token_pattern=r"(?u)\b[^\W\d_]{3,}\b",
        min_df=2,
        max_df=0.5,
        sublinear_tf=True,
    )
    try:
        weights = vectorizer.fit_transform(texts).tocsr()  # (N, V), rows L2-normalised
    except ValueError:  # no term occurs in two texts: nothing is salient
        return [[] for _ in texts]
    vocab = vectorizer.get_feature_names_out()
    out = []
    for row in range(weights.shape[0]):
        start, end = weights.indptr[row], weights.indptr[row + 1]
        cols, vals = weights.indices[start:end], weights.data[start:end]
        top = np.argsort(-vals, kind="stable")[:k]
        out.append([(str(vocab[cols[j]]), float(vals[j])) for j in top])
    return out
