"""The item layout (model.layout: items): exact scores, the depth head's loss, the sft and eval stages, the config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.model.item_layout import ItemLayoutModel  # noqa: E402

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dedup_codes(num_items: int) -> np.ndarray:
    """(N, 3): two quantised levels (3 x 4), then a dedup index among the items that share them."""
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.integers(0, 3, num_items), rng.integers(0, 4, num_items)], axis=1)
    dedup = np.zeros(num_items, dtype=np.int64)
    seen: dict[tuple, int] = {}
    for i, pair in enumerate(map(tuple, pairs)):
        dedup[i] = seen.get(pair, 0)
        seen[pair] = dedup[i] + 1
    return np.concatenate([pairs, dedup[:, None]], axis=1)


def test_scores_are_every_items_exact_log_probability_as_teacher_forcing_gives_it():
    # Quantised levels and a dedup level; or a group, then the item's own code (sid.collision: item).
    leaves = np.stack([np.arange(40) % 5, np.arange(40)], axis=1)
    vectors = torch.randn(40, 8)
    for codes, item_vectors in [(dedup_codes(40), None), (dedup_codes(40), vectors), (leaves, None)]:
        torch.manual_seed(0)
        model = ItemLayoutModel(codes, 6, 16, 1, 2, 1, 32, 0.0, item_vectors=item_vectors).eval()
        histories = [np.array([3, 4, 5]), np.array([39]), np.arange(8)]  # the last one is cut to 6
        scores = model.score(histories)  # (3, 40)
        assert torch.allclose(scores.logsumexp(dim=1), torch.zeros(3), atol=1e-5)
        h = model.forward(model.batch(histories))[:, -1]
        for b, target in enumerate([0, 17, 39]):
            nll = model.window_loss(h[b : b + 1], torch.tensor([target]))
            assert torch.allclose(-nll, scores[b, target], atol=1e-5)
        # Left padding and the cut to max_len leave a history's score unchanged.
        assert torch.allclose(model.score([np.arange(2, 8)])[0], scores[2], atol=1e-5)


def test_the_state_that_predicts_an_item_never_reads_it():
    torch.manual_seed(0)
    model = ItemLayoutModel(dedup_codes(30), 6, 16, 2, 2, 1, 32, 0.0).eval()
    with torch.no_grad():
        a = model.forward(model.batch([np.array([1, 2, 3, 4])]))  # (1, 6, H), items at positions 2..5
        b = model.forward(model.batch([np.array([1, 2, 3, 9])]))
        c = model.forward(model.batch([np.array([1, 2, 3])]))
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5], b[:, 5])
    assert torch.allclose(a[:, 4], c[:, 5], atol=1e-5)  # the state after item 3 is the 3-item history's


def test_checkpoint_round_trip_keeps_scores_and_frozen_vectors(tmp_path):
    from genrec.model import item_layout

    codes = dedup_codes(25)
    torch.manual_seed(0)
    model = ItemLayoutModel(codes, 5, 16, 2, 2, 2, 32, 0.1, item_vectors=torch.randn(25, 4)).eval()
    item_layout.save(model, tmp_path / "m", max_history=5)
    loaded = item_layout.load(tmp_path / "m", device="cpu")
    assert item_layout.is_item_layout(tmp_path / "m") and not loaded.training
    assert torch.equal(loaded.item_vectors, model.item_vectors)
    history = [np.array([0, 3, 24])]
    assert torch.allclose(loaded.score(history), model.score(history))
    with pytest.raises(ValueError, match="two items share a SID"):
        ItemLayoutModel(np.zeros((3, 2), dtype=np.int64), 5, 16, 1, 2, 1, 32, 0.0)
    with pytest.raises(ValueError, match="outside the model's 25 items"):
        model.score([np.array([25])])


def test_sft_and_eval_stages_train_save_and_rank_the_catalogue(tiny_dataset, tmp_path, capsys):
    sys.path.insert(0, str(TESTS))
    from genrec.eval.generative import evaluate_model_dir
    from genrec.model.recommender import GenerativeRecommender
    from genrec.pipeline import STAGES, StageContext
    from genrec.train.sft import run
    from test_sft import TINY, tiny_inputs, write_sft_inputs

    codes, texts = tiny_inputs(tiny_dataset)
    run_dir = tmp_path / "run"
    write_sft_inputs(tiny_dataset, codes, texts, run_dir)
    overrides = ["model.layout=items", "model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=1"]
    overrides += ["sft.max_epochs=4", "sft.eval_every=1", "sft.lr=0.01", "sft.batch_size=16", "sft.eval_users=0"]
    overrides += ["eval.ks=[5, 10]"]
    cfg = load_config(None, ["run_dir=unused", *TINY, f"run_dir={run_dir}", *overrides])
    out = tmp_path / "out"
    ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["sft"], out=out, work=tmp_path / "work")
    summary = run(ctx)

    rows = [json.loads(r) for r in (out / "curves.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert summary["layout"] == "items" and summary["best_valid_ndcg@10"] == max(r["valid_ndcg@10"] for r in rows)
    with pytest.raises(ValueError, match="item-layout model"):
        GenerativeRecommender.load(out / "model", device="cpu")

    # Run again with the work directory of the finished run: it resumes at epoch 4 and trains nothing.
    assert run(ctx)["epochs"] == 4

    (run_dir / "sft").mkdir()
    (out / "model").rename(run_dir / "sft" / "model")
    ev = StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["eval"], out=tmp_path / "eval", work=tmp_path / "ew")
    result = evaluate_model_dir(ev, run_dir / "sft" / "model", ev.out, "sft")
    assert result["ranking"] == "exact" and 0.0 <= result["test_ndcg@10"] <= 1.0
    metrics = json.loads((ev.out / "metrics.json").read_text())
    assert metrics["test"]["users"] == len(Dataset_examples(run_dir, "test"))

    # genrec recommend: the top k of the exact scores, the history's own items left out.
    from genrec.cli import main

    assert main(["recommend", str(run_dir), "--history", "0", "1", "-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranked = [
        int(line.split()[1])
        for line in lines[lines.index(next(x for x in lines if x.strip().startswith("rank"))) + 1 :]
    ]
    assert len(ranked) == 5 and not {0, 1} & set(ranked)
    assert main(["recommend", str(run_dir), "--history", "0", "--mode", "reasoning"]) == 1


def Dataset_examples(run_dir: Path, split: str):
    from genrec.data.dataset import Dataset

    return Dataset.load(run_dir / "prepare", 5).examples(split)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages=[sft, eval, rl]", "supports the stages sft and eval, not rl"),
        ("sft.tasks={seqrec: 1.0, item2sid: 1.0}", "trains the seqrec task alone"),
        ("model.lora_r=4", "trains every weight"),
        ("model.item_embedding=learned", "none or sasrec"),
        ("sft.sid_softmax=trie", "does not support sft.sid_softmax"),
        ("model.layout=item", "must be 'tokens' or 'items'"),
    ],
)
def test_config_refuses_what_the_item_layout_does_not_support(override, message):
    base = ["run_dir=r"] if override.startswith("model.layout") else ["run_dir=r", "model.layout=items"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*base, override])
