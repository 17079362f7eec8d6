"""Methods from papers, built on the generative core: each brings its tasks, rewards and inference modes.

A method lives in its own package (``genrec.methods.<name>``) and plugs into the core through
its extension points: task builders passed to ``genrec.train.sft.train_sft``, rewards and
columns passed to ``genrec.train.rl.train_rl``, and rankers for ``genrec.eval.evaluate``.
"""
