"""The answer format of an interest miner, and its strict validation.

An answer is one JSON object (DeepInterestGR's descriptor format, with a rationale added):

    {"reasoning": "...",
     "descriptors": [{"descriptor": "hydrating skin care", "rationale": "title says ...", "confidence": 0.8}]}

``reasoning`` (the chain of thought) is optional. Code fences and text around the object are
tolerated; anything else that is not exactly this shape is a :class:`MalformedAnswer`,
whose ``reason`` (``empty``, ``refusal``, ``invalid_json``, ``schema``) is what the failure
records say and whose message is quoted back to the model when it is asked again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Openings of an answer that declines the task (checked only when no JSON object parses).
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can ?not|i can't|i won't|i will not|i'm unable|i am unable|"
    r"as an ai|unfortunately,? i)",
    re.IGNORECASE,
)
MAX_DESCRIPTOR_CHARS = 80
ALLOWED_KEYS = {"descriptor", "rationale", "confidence"}


class MalformedAnswer(ValueError):
    """An answer that is not a valid interest list; ``reason`` classifies it for the failure records."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Interest:
    """One mined interest: a short phrase, why it was inferred, and how sure the miner is."""

    interest: str
    rationale: str
    confidence: float


def normalize(text: str) -> str:
    """The form under which two interests are the same one: lower case, words only."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in ``text``, in order (decoding from each ``{``)."""
    decoder = json.JSONDecoder()
    found, pos = [], 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        pos = end
    return found


def extract_json(text: str) -> dict:
    """The answer's JSON object: the last one holding ``descriptors``, else the last one.

    Models that think aloud before answering, or wrap the answer in a ```json fence, still
    parse; the last object wins because reasoning text may quote examples before the answer.
    """
    stripped = (text or "").strip()
    if not stripped:
        raise MalformedAnswer("empty", "the answer was empty")
    objects = _json_objects(stripped)
    if not objects:
        if REFUSAL.match(stripped):
            raise MalformedAnswer("refusal", f"the answer declined the task: {stripped[:120]!r}")
        raise MalformedAnswer("invalid_json", f"the answer holds no JSON object: {stripped[:120]!r}")
    with_key = [o for o in objects if "descriptors" in o]
    return (with_key or objects)[-1]


def parse_interests(text: str, max_interests: int) -> list[Interest]:
    """Validate an answer and return its first ``max_interests`` interests, strictly.

    Rules: a ``descriptors`` list with at least one entry; each entry has exactly the keys
    descriptor, rationale, confidence; descriptor and rationale are non-empty strings
    (descriptor at most 80 characters); confidence is a number in [0, 1]; no two
    descriptors are equal after :func:`normalize`.
    """
    obj = extract_json(text)
    descriptors = obj.get("descriptors")
    if not isinstance(descriptors, list) or not descriptors:
        raise MalformedAnswer("schema", '"descriptors" must be a non-empty list of objects')
    out, seen = [], set()
    for i, entry in enumerate(descriptors):
        where = f"descriptors[{i}]"
        if not isinstance(entry, dict):
            raise MalformedAnswer("schema", f"{where} must be an object, got {type(entry).__name__}")
        extra = sorted(set(entry) - ALLOWED_KEYS)
        missing = sorted(ALLOWED_KEYS - set(entry))
        if extra or missing:
            raise MalformedAnswer(
                "schema",
                f"{where} must have exactly the keys descriptor, rationale, confidence"
                f" (missing: {missing or 'none'}, unexpected: {extra or 'none'})",
            )
        phrase, rationale, confidence = entry["descriptor"], entry["rationale"], entry["confidence"]
        if not isinstance(phrase, str) or not normalize(phrase):
            raise MalformedAnswer("schema", f"{where}.descriptor must be a non-empty string")
        if len(phrase.strip()) > MAX_DESCRIPTOR_CHARS:
            raise MalformedAnswer(
                "schema", f"{where}.descriptor must be a short phrase (<= {MAX_DESCRIPTOR_CHARS} chars)"
            )
        if not isinstance(rationale, str) or not rationale.strip():
            raise MalformedAnswer("schema", f"{where}.rationale must be a non-empty string")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
            raise MalformedAnswer("schema", f"{where}.confidence must be a number in [0, 1], got {confidence!r}")
        key = normalize(phrase)
        if key in seen:
            raise MalformedAnswer("schema", f"{where}.descriptor {phrase!r} duplicates an earlier one")
        seen.add(key)
        out.append(Interest(" ".join(phrase.split()), " ".join(rationale.split()), float(confidence)))
    return out[:max_interests]


def parse_caption(text: str) -> str:
    """Validate an image caption: non-empty plain text that does not decline the task."""
    stripped = " ".join((text or "").split())
    if not stripped:
        raise MalformedAnswer("empty", "the caption was empty")
    if REFUSAL.match(stripped):
        raise MalformedAnswer("refusal", f"the caption declined the task: {stripped[:120]!r}")
    return stripped
