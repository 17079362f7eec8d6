"""Chain-of-thought prompts that mine interests from an item, a user's training history, or an image.

The model is asked to reason first (inside the JSON's ``reasoning`` field, so the answer
stays one parseable object) and then to list interests grounded only in the evidence
shown, as DeepInterestGR's miner does. Changing any text here changes every cache key, so
the next run asks afresh rather than mixing answers to two different prompts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

SYSTEM = (
    "You are an analyst of shopping behaviour. You infer the deep interests behind products and purchase "
    "histories: the needs, motivations, tastes and usage situations that lead people to them. You use only "
    "the evidence you are given, and you answer with one JSON object and nothing else."
)

ANSWER_FORMAT = (
    "Think step by step, then answer with exactly this JSON object and nothing else:\n"
    '{{"reasoning": "<your step-by-step reasoning, at most 4 sentences>", '
    '"descriptors": [{{"descriptor": "<interest, a short phrase of 2 to 6 words>", '
    '"rationale": "<the evidence above that supports it>", "confidence": <a number from 0 to 1>}}]}}\n'
    "Give at most {k} descriptors, the most important first, each different from the others. "
    'Prefer specific motivations ("sensitive-skin friendly hydration") over generic ones ("beauty").'
)

CORRECTION = (
    "Your previous answer could not be used: {problem}. Answer again with only the JSON object in the "
    "format described, with keys descriptor, rationale and confidence in every descriptor."
)

CAPTION = (
    "Product: {title}\n"
    "Describe only what is visible in the image and relevant to why someone would buy or use this product: "
    "the kind of object, its materials, colours, style, packaging and any text printed on it. "
    "One short paragraph, no guesses beyond the image."
)

ITEM_FIELDS = (
    ("title", "Title"),
    ("brand", "Brand"),
    ("categories", "Categories"),
    ("description", "Description"),
    ("caption", "Image"),
)


def clip(value: object, max_chars: int) -> str:
    """One line of at most ``max_chars`` characters (cut on a word boundary); "" for missing values."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = re.sub(r"\s+", " ", str(value)).strip()
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def describe_item(item: Mapping, max_chars: int) -> str:
    """``Title: ...; Brand: ...`` over the item's non-empty fields."""
    parts = [
        f"{label}: {clip(item.get(key), max_chars)}" for key, label in ITEM_FIELDS if clip(item.get(key), max_chars)
    ]
    return "; ".join(parts) or "(no information)"


def item_messages(item: Mapping, max_interests: int, max_chars: int) -> list[dict]:
    """Messages asking for the interests that would lead someone to this item."""
    user = (
        f"A product:\n{describe_item(item, max_chars)}\n\n"
        "What deep interests would lead a person to buy or use this product? Consider who it is for, the need "
        "it meets, the situation it is used in and the taste it expresses.\n\n" + ANSWER_FORMAT.format(k=max_interests)
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def user_messages(
    history: Sequence[Mapping], max_interests: int, max_chars: int, reviews: Sequence[str] | None = None
) -> list[dict]:
    """Messages asking for a user's interests from their training history (oldest first).

    ``reviews``, where the data has them, are the user's own review texts aligned with ``history``.
    """
    lines = []
    for i, item in enumerate(history):
        line = f"{i + 1}. {describe_item(item, max_chars)}"
        review = clip(reviews[i], max_chars) if reviews is not None else ""
        if review:
            line += f"; Their review: {review}"
        lines.append(line)
    user = (
        "A person interacted with these products, oldest first:\n" + "\n".join(lines) + "\n\n"
        "What deep interests explain this history? Look for recurring needs, tastes and situations, and how "
        "they change over time; weigh recent products more.\n\n" + ANSWER_FORMAT.format(k=max_interests)
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def correction_messages(messages: list[dict], answer: str, problem: str) -> list[dict]:
    """The conversation extended with the unusable answer and what was wrong with it."""
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": CORRECTION.format(problem=problem)},
    ]


def caption_messages(title: str, image_part: dict, max_chars: int) -> list[dict]:
    """Messages asking a vision-language model to describe an item's image (OpenAI content parts)."""
    text = CAPTION.format(title=clip(title, max_chars) or "(untitled)")
    return [{"role": "user", "content": [{"type": "text", "text": text}, image_part]}]
