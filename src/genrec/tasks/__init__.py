"""SFT task builders, chosen by name in ``sft.tasks`` (name -> mixing weight).

A builder is ``build(data: TaskData, fmt: PromptFormat) -> ExampleSet`` (see ``base``).
Methods that bring their own tasks (reasoning traces, interests) add a builder here and,
for pretrained backbones, an instruction to ``genrec.model.prompt.INSTRUCTIONS``, or pass
extra builders to ``genrec.train.sft.train_sft``.
"""

from __future__ import annotations

from genrec.tasks import item_text, seqrec, titles

TASKS = {
    "seqrec": seqrec.build,
    "item2sid": item_text.build_item2sid,
    "sid2title": item_text.build_sid2title,
    "titles2sid": titles.build,
}
