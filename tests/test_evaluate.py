import numpy as np
import pandas as pd
import pytest

from genrec.config import EvalConfig
from genrec.errors import ConfigError
from genrec.eval.evaluate import evaluate, filter_ranked, topk_from_scores
from genrec.eval.metrics import compute_metrics, target_ranks


def test_topk_excludes_seen_and_breaks_ties_by_item_id():
    scores = np.array([[1.0, 3.0, 3.0, 0.5, 3.0]], dtype=np.float32)
    assert topk_from_scores(scores, [np.array([2])], 3, exclude_seen=True).tolist() == [[1, 4, 0]]
    assert topk_from_scores(scores, [np.array([2])], 3, exclude_seen=False).tolist() == [[1, 2, 4]]


def test_filter_ranked_drops_seen_and_padding():
    ranked = np.array([[5, -1, 3, 7, 2]])
    assert filter_ranked(ranked, [np.array([3])], 3, exclude_seen=True).tolist() == [[5, 7, 2]]
    assert filter_ranked(ranked, [np.array([3, 7, 2])], 3, exclude_seen=True).tolist() == [[5, -1, -1]]


def test_evaluate_writes_predictions_that_reproduce_metrics(tiny_dataset, tmp_path):
    rng = np.random.default_rng(0)
    table = rng.random((tiny_dataset.num_items,)).astype(np.float32)
    cfg = EvalConfig(ks=[1, 5, 10], bootstrap=50)
    res = evaluate(lambda h: np.tile(table, (len(h), 1)), tiny_dataset, cfg, tmp_path, model_name="random")
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    for split in ("valid", "test"):
        part = preds[preds.split == split]
        ex = tiny_dataset.examples(split)
        # every target is the true held-out item of its user
        seqs = [tiny_dataset.sequences[u] for u in part.user_id]
        pos = tiny_dataset.valid_pos if split == "valid" else tiny_dataset.test_pos
        assert [s[pos[u]] for s, u in zip(seqs, part.user_id)] == part.target.tolist()
        assert part.target.tolist() == ex.targets.tolist()
        ranked = np.stack(part.ranked.to_list())
        assert ranked.shape == (len(ex), 10)
        # seen items never ranked
        for row, seen in zip(ranked, ex.seen):
            assert not np.isin(row, seen).any()
        again = compute_metrics(target_ranks(ranked, part.target.to_numpy()), cfg.ks)
        for k, v in again.items():
            assert res[split][k] == v


def test_an_oracle_ranker_scores_one(tiny_dataset, tmp_path):
    ex = tiny_dataset.examples("test")
    target_of = {tuple(h): t for h, t in zip(ex.histories, ex.targets)}

    def oracle(histories):
        out = np.zeros((len(histories), tiny_dataset.num_items), dtype=np.float32)
        for b, h in enumerate(histories):
            out[b, target_of[tuple(h)]] = 1.0
        return out

    res = evaluate(oracle, tiny_dataset, EvalConfig(bootstrap=0), tmp_path, splits=("test",))
    assert res["test"]["hr@1"] == 1.0 and res["test"]["ndcg@1"] == 1.0


def test_eval_splits_config_chooses_the_ranked_splits(tiny_dataset, tmp_path):
    calls = []

    def ranker(histories):
        calls.append(len(histories))
        return np.zeros((len(histories), tiny_dataset.num_items), dtype=np.float32)

    res = evaluate(ranker, tiny_dataset, EvalConfig(bootstrap=0, splits=["test"]), tmp_path)
    assert "test" in res and "valid" not in res
    assert set(pd.read_parquet(tmp_path / "predictions.parquet").split) == {"test"}
    assert sum(calls) == len(tiny_dataset.examples("test"))
    # the given order never matters; an unknown split is a config error naming the field
    assert EvalConfig(splits=["test", "valid"]).splits == ["valid", "test"]
    with pytest.raises(ConfigError, match="eval.splits"):
        EvalConfig(splits=["train"])
