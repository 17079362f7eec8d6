"""The fixed token ids that frame every task's sequence, shared by training and inference.

Every SFT sequence is ``head(task) + input + answer + output`` built from token ids, never
by tokenizing a joined string, so the prompt that ``GenerativeRecommender.prompt_batch``
builds at inference is the exact id sequence the model saw in training. Two styles:

- ``markers`` (the scratch model): ``head(task) = [<bos>, <task>]`` with one special token
  per task, ``answer = [<answer>]``, ``sep = [<sep>]``;
- ``instructions`` (a pretrained backbone): ``head(task)`` is a short English instruction,
  so the pretrained model's language knowledge applies.

The format is saved with the model (``genrec.json``) and read back, never rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Special tokens of the scratch tokenizer, besides the task markers ("<seqrec>", ...).
PAD, BOS, EOS, SEP, ANSWER = "<pad>", "<bos>", "<eos>", "<sep>", "<answer>"
BASE_SPECIAL_TOKENS = (PAD, BOS, EOS, SEP, ANSWER)

# The natural-language head of each task for pretrained backbones. A task registered later
# (genrec.tasks.TASKS) adds its instruction here.
INSTRUCTIONS = {
    "seqrec": "Here is the history of items a user interacted with, in order. Continue it with the next item:",
    "item2sid": "Which item does this text describe?",
    "sid2title": "What is the title of this item?",
    "titles2sid": "A user interacted with these items, in order. Which item comes next?",
    "interest2sid": "A user with these interests interacted with these items, in order. Which item comes next?",
}
# Text tags a task's sequences use besides its marker (DeepRec's tool-call tags, ...). The
# scratch tokenizer makes each one special token; a pretrained tokenizer reads them as text.
# A task registered later adds its tags here.
TASK_TOKENS: dict[str, tuple[str, ...]] = {}
ANSWER_TEXT = " Answer:"
SEP_TEXT = "; "


def task_marker(task: str) -> str:
    return f"<{task}>"


@dataclass
class PromptFormat:
    style: str  # "markers" or "instructions"
    heads: dict[str, list[int]]  # task name -> ids that open its sequence
    answer: list[int]  # between a task's input and its output
    sep: list[int]  # between the items of a list of texts
    eos_id: int
    pad_id: int

    def head(self, task: str) -> list[int]:
        if task not in self.heads:
            raise KeyError(f"the prompt format has no head for task {task!r}; it knows {sorted(self.heads)}")
        return self.heads[task]

    @classmethod
    def markers(cls, tokenizer, tasks: Iterable[str]) -> PromptFormat:
        """The scratch style; the tokenizer must hold the base special tokens and one marker per task."""
        tasks = _with_seqrec(tasks)
        ids = {tok: _single_id(tokenizer, tok) for tok in [*BASE_SPECIAL_TOKENS, *map(task_marker, tasks)]}
        heads = {task: [ids[BOS], ids[task_marker(task)]] for task in tasks}
        return cls("markers", heads, [ids[ANSWER]], [ids[SEP]], ids[EOS], ids[PAD])

    @classmethod
    def instructions(cls, tokenizer, tasks: Iterable[str]) -> PromptFormat:
        """The pretrained style: English instructions; pad falls back to eos where the tokenizer has none."""
        missing = [t for t in _with_seqrec(tasks) if t not in INSTRUCTIONS]
        if missing:
            raise ValueError(
                f"no instruction text for task(s) {missing}: add them to genrec.model.prompt.INSTRUCTIONS "
                "when registering the task builder"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the pretrained tokenizer has no eos token; sid2title needs one to end titles")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        heads = {task: bos + encode(INSTRUCTIONS[task] + " ") for task in _with_seqrec(tasks)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls("instructions", heads, encode(ANSWER_TEXT + " "), encode(SEP_TEXT), tokenizer.eos_token_id, pad)

    def to_json(self) -> dict:
        return {
            "style": self.style,
            "heads": self.heads,
            "answer": self.answer,
            "sep": self.sep,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    @classmethod
    def from_json(cls, data: dict) -> PromptFormat:
        return cls(**data)


def _with_seqrec(tasks: Iterable[str]) -> list[str]:
    # The recommender's prompt is the seqrec head, so it exists even when seqrec is not trained.
    return list(dict.fromkeys(["seqrec", *tasks]))


def _single_id(tokenizer, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {token!r} into {len(ids)} tokens; it must be one special token")
    return ids[0]
