"""Item text: one string per item, built from its fields with a per-dataset template.

A template is a format string over item columns, e.g. ``"{title}. Brand: {brand}."``.
The literal text before a field is that field's label: when the field is empty, the label
goes with it, so an item without a brand reads ``"Lipstick."`` rather than
``"Lipstick. Brand: ."``. Columns that are lists (mined ``interests``) are joined with "; ".
An item whose text is still empty gets its ``raw_id`` as text and is reported.
"""

from __future__ import annotations

import logging
import re
import string

import numpy as np
import pandas as pd

log = logging.getLogger("genrec")

# Named templates; a dataset config picks one or gives its own format string.
TEMPLATES = {
    # Everything known about the item; "interests" is the optional column of mined interests.
    "default": "{title}. Brand: {brand}. Categories: {categories}. {description}. Interests: {interests}.",
    "title": "{title}",
    "title_categories": "{title}. Categories: {categories}.",
}

# Fields a template may name although the items table lacks them (they read as empty).
OPTIONAL_FIELDS = ("brand", "categories", "description", "interests")


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """``"{title}. Brand: {brand}."`` -> ``[("", "title"), (". Brand: ", "brand"), (".", None)]``."""
    fmt = TEMPLATES.get(template, template)
    try:
        parts = [(literal, name) for literal, name, _, _ in string.Formatter().parse(fmt)]
    except ValueError as exc:
        raise ValueError(f"text.template {template!r} is not a valid format string: {exc}") from exc
    names = [n for _, n in parts if n is not None]
    if not names or any(not n.isidentifier() for n in names):
        raise ValueError(
            f"text.template {template!r} must name item fields in braces, e.g. '{{title}}. Brand: {{brand}}.', "
            f"or be one of {', '.join(TEMPLATES)}"
        )
    return parts


def _field_text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "; ".join(str(v).strip() for v in value if str(v).strip())
    # Collapse newlines and runs of spaces; drop a trailing period so the template's own
    # punctuation does not double it (Scientific titles end with ".").
    return re.sub(r"\s+", " ", str(value)).strip().rstrip(".").strip()


def compose_text(row: dict, parts: list[tuple[str, str | None]], max_chars: int) -> str:
    """One item's text: each field with its label, empty fields dropped, capped at ``max_chars`` on a word boundary."""
    pieces = []
    for literal, name in parts:
        if name is None:
            pieces.append(literal)
            continue
        value = _field_text(row.get(name))
        if value:
            pieces.append(literal + value)
    text = "".join(pieces)
    # Strip separators left dangling by dropped fields at the start, and empty trailing punctuation.
    text = re.sub(r"\s+", " ", text).strip().lstrip(".,;:|- ").strip()
    if not re.search(r"\w", text):
        return ""
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind(" ")] if " " in cut else cut
    return text


def compose_texts(items: pd.DataFrame, template: str = "default", max_chars: int = 512) -> tuple[list[str], list[int]]:
    """Texts of all items in row order, and the item_ids whose text fell back to their raw_id."""
    for col in ("item_id", "raw_id"):
        if col not in items.columns:
            raise ValueError(f"items table has no {col!r} column (columns: {', '.join(map(str, items.columns))})")
    dup = items["item_id"][items["item_id"].duplicated()]
    if len(dup):
        raise ValueError(
            f"items table lists item_id {int(dup.iloc[0])} more than once ({len(dup)} duplicate rows): "
            "rerun the 'prepare' stage"
        )
    parts = parse_template(template)
    missing = [n for _, n in parts if n is not None and n not in items.columns and n not in OPTIONAL_FIELDS]
    if missing:
        raise ValueError(
            f"text.template names field {missing[0]!r}, which the items table does not have "
            f"(columns: {', '.join(map(str, items.columns))}): fix text.template"
        )
    texts, fallback = [], []
    for row in items.to_dict("records"):
        text = compose_text(row, parts, max_chars)
        if not text:
            text = str(row["raw_id"]).strip()
            fallback.append(int(row["item_id"]))
            if not text:
                raise ValueError(f"item_id {row['item_id']} has neither text nor a raw_id: rerun the 'prepare' stage")
        texts.append(text)
    if len(fallback) == len(texts):
        raise ValueError(
            f"every item text is empty under text.template {template!r}: the template's fields "
            f"({', '.join(n for _, n in parts if n)}) are empty for all {len(texts)} items; choose fields the data has"
        )
    return texts, fallback


def fold_interests(items: pd.DataFrame, interests: pd.DataFrame, which: str) -> pd.DataFrame:
    """IEID: ``items`` with an ``interests`` column, each item's mined interests in rank order.

    ``which`` is "all" or "positive" (only rows whose ``label`` is true: the RLDI-curated ones).

    >>> items = pd.DataFrame({"item_id": [0, 1]})
    >>> mined = pd.DataFrame({"item_id": [0, 0, 1], "rank": [1, 0, 0], "interest": ["b", "a", "c"],
    ...                       "label": [True, True, False]})
    >>> fold_interests(items, mined, "positive")["interests"].tolist()
    [['a', 'b'], []]
    """
    if which == "positive":
        interests = interests[interests["label"].astype(bool)]
    per_item = interests.sort_values(["item_id", "rank"]).groupby("item_id")["interest"].apply(list)
    out = items.copy()
    out["interests"] = [per_item.get(int(i), []) for i in out["item_id"]]
    return out


def run(ctx) -> dict:
    items = pd.read_parquet(ctx.input("prepare") / "items.parquet")
    which = ctx.cfg.text.interests
    if which != "none":
        if "interests" not in {n for _, n in parse_template(ctx.cfg.text.template)}:
            raise ValueError(
                f"text.interests={which} needs a text.template that names {{interests}} (the 'default' template "
                f"does), got {ctx.cfg.text.template!r}"
            )
        source = ctx.input("rldi" if which == "positive" else "interests") / "item_interests.parquet"
        items = fold_interests(items, pd.read_parquet(source), which)
    texts, fallback = compose_texts(items, ctx.cfg.text.template, ctx.cfg.text.max_chars)
    pd.DataFrame({"item_id": items["item_id"].to_numpy(np.int64), "text": texts}).to_parquet(
        ctx.out / "items_text.parquet", index=False
    )
    if fallback:
        log.warning(
            "text: %d items have empty text under template %r; their raw_id is used instead (item_ids %s)",
            len(fallback),
            ctx.cfg.text.template,
            fallback[:10],
        )
    lengths = np.array([len(t) for t in texts])
    print(f"item texts: {len(texts):,} items, mean {lengths.mean():.0f} chars, {len(fallback)} empty (raw_id used)")
    for t in texts[:3]:
        print(f"  {t[:160]}")
    return {
        "n_items": len(texts),
        "n_empty": len(fallback),
        "empty_item_ids": fallback[:20],
        "mean_chars": round(float(lengths.mean()), 1),
        "interests": which,
        "items_with_interests": int(sum(len(v) > 0 for v in items["interests"])) if which != "none" else 0,
        "examples": texts[:3],
    }
