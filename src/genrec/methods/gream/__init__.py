"""GREAM (Generative Reasoning Recommendation via LLMs; genrec issue 7, docs/gream.md).

- ``config``: the ``gream`` config section;
- ``chains``: reasoning chains (data-derived, or from a teacher LLM), with a denoised rewrite;
- ``tasks``: the ``co2sid`` alignment task and the ``gream_reason`` curriculum task;
- ``reasoning``: reasoning-mode inference (rationale, then trie-constrained SID beam search);
- ``stage``: the SFT / RL (SRPO) / evaluation entry points that the pipeline calls.
"""
