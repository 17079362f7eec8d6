"""SFT task builders: windows, no leakage of held-out items, one-pass = per-prefix, prompt = training format."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from genrec.config import load_config  # noqa: E402
from genrec.model.backbone import scratch_backbone  # noqa: E402
from genrec.model.recommender import GenerativeRecommender  # noqa: E402
from genrec.model.tokenizer import build_scratch_tokenizer  # noqa: E402
from genrec.sid.trie import SIDTrie  # noqa: E402
from genrec.tasks import TASKS  # noqa: E402
from genrec.tasks.base import TaskData, epoch_examples  # noqa: E402
from genrec.tasks.seqrec import seqrec_windows  # noqa: E402

SIZES = [4, 4, 4]
ALL_TASKS = ["seqrec", "item2sid", "sid2title", "titles2sid"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_codes(num_items: int, seed: int = 0) -> np.ndarray:
    flat = np.random.default_rng(seed).choice(int(np.prod(SIZES)), size=num_items, replace=False)
    return np.stack(np.unravel_index(flat, SIZES), axis=1).astype(np.int64)


def setup(dataset, stride: int = 0, dropout: float = 0.0):
    """Backbone, codes and TaskData for ``dataset`` (the conftest tiny dataset: 40 users, 30 items)."""
    codes = random_codes(dataset.num_items)
    texts = [f"{t}. {c}" for t, c in zip(dataset.titles, dataset.items["categories"])]
    tokenizer = build_scratch_tokenizer(texts, 300, SIZES, ALL_TASKS)
    cfg = load_config(
        None,
        [
            "run_dir=x",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.num_kv_heads=1",
            "model.intermediate_size=64",
            f"model.dropout={dropout}",
        ],
    )
    bb = scratch_backbone(cfg.model, tokenizer, SIZES, ALL_TASKS, seed=0)
    data = TaskData(
        dataset.train_sequences(),
        bb.vocab.sid_to_ids(codes),
        texts,
        dataset.titles,
        tokenizer,
        max_history=dataset.max_history,
        window_stride=stride,
        text_history=3,
        max_text_tokens=12,
    )
    return bb, codes, data


def leaked_targets(dataset, sets, sid_ids: np.ndarray) -> list[tuple[str, int, int]]:
    """(task, user, item) for every labelled SID or input SID of a user that is not one of their training items."""
    item_of = {tuple(row): i for i, row in enumerate(sid_ids.tolist())}
    levels = sid_ids.shape[1]
    train = dataset.train_sequences()
    bad = []
    for examples in sets:
        for i in range(len(examples)):
            ex = examples[i]
            if ex.user < 0:
                continue
            is_sid = ex.input_ids >= sid_ids.min()
            sid_tokens = ex.input_ids[is_sid].reshape(-1, levels)  # every SID in the example, in order
            for row in sid_tokens.tolist():
                item = item_of[tuple(row)]
                if item not in train[ex.user]:
                    bad.append((examples.name, ex.user, item))
    return bad


def test_windows_cover_every_target_once_with_enough_history():
    assert seqrec_windows([np.arange(7)], max_history=3, stride=2).tolist() == [
        [0, 3, 7, 5],
        [0, 1, 5, 3],
        [0, 0, 3, 1],
    ]
    assert seqrec_windows([np.arange(1), np.arange(2)], max_history=3, stride=3).tolist() == [[1, 0, 2, 1]]
    rng = np.random.default_rng(0)
    seqs = [np.arange(n) for n in rng.integers(1, 40, size=30)]
    for max_history, stride in [(5, 5), (5, 2), (5, 1), (20, 20)]:
        windows = seqrec_windows(seqs, max_history, stride)
        for user, seq in enumerate(seqs):
            mine = windows[windows[:, 0] == user]
            targets = np.concatenate([np.arange(f, e) for _, _, e, f in mine]) if len(mine) else np.zeros(0)
            assert sorted(targets.tolist()) == list(range(1, len(seq)))  # each target exactly once
            for _, start, end, loss_from in mine:
                assert end - start <= max_history + 1
                # history of target j is [start, j): at least max_history - stride + 1 items, or all before it
                assert loss_from - start >= min(loss_from, max_history - stride + 1)


def test_no_task_uses_a_valid_or_test_item_of_the_user(tiny_dataset):
    bb, codes, data = setup(tiny_dataset)
    sets = [TASKS[name](data, bb.fmt) for name in ALL_TASKS]
    assert all(len(s) > 0 for s in sets)
    assert leaked_targets(tiny_dataset, sets, data.sid_ids) == []
    # The check does catch a leak: the same tasks built from the full sequences leak held-out items.
    leaky = TaskData(
        tiny_dataset.sequences, data.sid_ids, data.item_texts, data.titles, data.tokenizer, tiny_dataset.max_history
    )
    found = leaked_targets(
        tiny_dataset, [TASKS["seqrec"](leaky, bb.fmt), TASKS["titles2sid"](leaky, bb.fmt)], data.sid_ids
    )
    held = {
        (u, int(tiny_dataset.sequences[u][p]))
        for u in range(tiny_dataset.num_users)
        for p in (tiny_dataset.valid_pos[u], tiny_dataset.test_pos[u])
    }
    assert found and {(u, i) for _, u, i in found} == held


@pytest.mark.parametrize("stride", [0, 2])
def test_one_pass_logits_equal_the_per_prefix_prompts_of_inference(tiny_dataset, stride):
    bb, codes, data = setup(tiny_dataset, stride=stride, dropout=0.2)
    rec = GenerativeRecommender(
        bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, tiny_dataset.max_history
    )
    bb.model.eval()
    task = TASKS["seqrec"](data, bb.fmt)
    levels, head = len(SIZES), len(bb.fmt.head("seqrec"))
    checked = 0
    for i in range(len(task)):
        ex = task[i]
        user, start, end, loss_from = task.windows[i]
        with torch.no_grad():
            logits = bb.model(input_ids=torch.as_tensor(ex.input_ids)[None]).logits[0]  # (T, V)
        seq = data.train_sequences[user]
        for j in range(loss_from, end):
            history = seq[start:j]
            pos = head + (j - start) * levels  # index of the target's first SID token
            prompt, _ = rec.prompt_batch([history])
            # The training sequence up to the target IS the inference prompt of that history.
            assert ex.input_ids[:pos].tolist() == prompt[0].tolist()
            assert ex.labels[pos : pos + levels].tolist() == data.sid_ids[seq[j]].tolist()
            with torch.no_grad():
                alone = bb.model(input_ids=prompt).logits[0, -1]  # (V,)
            torch.testing.assert_close(logits[pos - 1], alone, atol=1e-4, rtol=1e-4)
            checked += 1
        assert (ex.labels[: head + (loss_from - start) * levels] == -100).all()  # context only, no loss
    assert checked == sum(len(s) - 1 for s in data.train_sequences)


def test_text_task_examples_have_the_documented_layout(tiny_dataset):
    bb, codes, data = setup(tiny_dataset)
    tok, fmt = data.tokenizer, bb.fmt
    item2sid = TASKS["item2sid"](data, fmt)[3]
    assert tok.decode(item2sid.input_ids) == f"<bos><item2sid>{data.item_texts[3]}<answer>" + bb.vocab.sid_string(
        codes[3]
    )
    assert (item2sid.labels[:-3] == -100).all() and item2sid.labels[-3:].tolist() == data.sid_ids[3].tolist()

    sid2title = TASKS["sid2title"](data, fmt)[3]
    assert (
        tok.decode(sid2title.input_ids) == f"<bos><sid2title>{bb.vocab.sid_string(codes[3])}<answer>item 3 title<eos>"
    )
    n_title = len(data.title_ids[3]) + 1
    assert (sid2title.labels[:-n_title] == -100).all() and (
        sid2title.labels[-n_title:] == sid2title.input_ids[-n_title:]
    ).all()

    titles = TASKS["titles2sid"](data, fmt)
    user, j = titles.targets[5]
    seq = data.train_sequences[user]
    hist = "<sep>".join(f"item {i} title" for i in seq[max(0, j - 3) : j])
    ex = titles[5]
    assert tok.decode(ex.input_ids) == f"<bos><titles2sid>{hist}<answer>" + bb.vocab.sid_string(codes[seq[j]])
    assert ex.user == user and len(ex.input_ids) == titles.lengths[5]


def test_epoch_examples_draw_by_weight_fresh_each_epoch_and_reproducibly():
    class Fake:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    sets = [Fake(10), Fake(8), Fake(4)]
    rows = epoch_examples(sets, [1.0, 0.25, 2.5], seed=0, epoch=0)
    counts = np.bincount(rows[:, 0], minlength=3).tolist()
    assert counts == [10, 2, 10]
    assert sorted(rows[rows[:, 0] == 0, 1].tolist()) == list(range(10))
    assert np.array_equal(rows, epoch_examples(sets, [1.0, 0.25, 2.5], seed=0, epoch=0))
    picks = {tuple(sorted(epoch_examples(sets, [0, 0.5, 0], seed=0, epoch=e)[:, 1].tolist())) for e in range(6)}
    assert len(picks) > 1  # a different half of the task each epoch
