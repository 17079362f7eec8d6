"""RLDI: behaviour labels from the training split only, the judge path, the classifier's held-out measures."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from genrec.config import ConfigError, load_config
from genrec.data.dataset import Dataset
from genrec.interests.config import BackendConfig, InterestsConfig, RLDIConfig
from genrec.interests.miner import mine_item_interests
from genrec.interests.offline import OfflineMiner
from genrec.interests.rldi import (
    behaviour_labels,
    fit_and_measure,
    item_quality,
    label_interests,
    parse_judge,
    prefix_dataset,
    profiles,
)
from genrec.interests.schema import MalformedAnswer
from test_interests_backends import FakeOpenAI, Reply, first_user_text
from test_interests_mining import toy_embed


def topical_dataset(num_users: int = 60, num_items: int = 30, seed: int = 0) -> Dataset:
    """Users who stay inside one category (Sub0..Sub2) while brands are random: category interests predict."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": np.arange(num_items),
            "raw_id": [f"i{i}" for i in range(num_items)],
            "title": [f"item {i}" for i in range(num_items)],
            "brand": [f"brand{i % 4}" for i in range(num_items)],
            "categories": [f"Cat, Sub{i % 3}" for i in range(num_items)],
            "description": "",
        }
    )
    seqs = []
    for u in range(num_users):
        pool = np.arange(u % 3, num_items, 3)
        seqs.append(rng.choice(pool, size=int(rng.integers(6, 10)), replace=False))
    sequences = pd.DataFrame(
        {
            "user_id": np.arange(num_users),
            "raw_user": [f"u{u}" for u in range(num_users)],
            "item_ids": seqs,
            "timestamps": [np.arange(len(s), dtype=np.float64) for s in seqs],
            "valid_pos": [len(s) - 2 for s in seqs],
            "test_pos": [len(s) - 1 for s in seqs],
        }
    )
    return Dataset(items, sequences, max_history=5)


def offline_item_interests(dataset: Dataset, cfg: InterestsConfig) -> pd.DataFrame:
    miner = OfflineMiner(dataset.items, max_interests=cfg.max_interests)
    return mine_item_interests(dataset.items, [miner], None, cfg, progress=False).frame


def test_prefix_view_holds_only_training_items_before_the_holdout(tiny_dataset):
    view, heldout = prefix_dataset(tiny_dataset, holdout=2)
    train = tiny_dataset.train_sequences()
    assert (view.valid_pos == -1).all() and (view.test_pos == -1).all()
    for u, seq in enumerate(tiny_dataset.sequences):
        assert view.train_sequences()[u].tolist() == train[u][:-2].tolist()
        assert heldout[u].tolist() == train[u][-2:].tolist()
        held = {int(seq[tiny_dataset.valid_pos[u]]), int(seq[tiny_dataset.test_pos[u]])}
        assert not held & set(view.sequences[u].tolist()) and not held & set(heldout[u].tolist())


def test_behaviour_labels_compare_the_future_with_the_base_rate():
    vec = {"lips": np.array([1.0, 0.0]), "lip care": np.array([0.9, np.sqrt(1 - 0.81)]), "hair": np.array([0.0, 1.0])}
    items = pd.DataFrame({"item_id": [0, 1, 2], "interest": ["lips", "lips", "hair"]})
    pairs = pd.DataFrame({"user_id": [0, 0, 0, 1], "interest": ["lips", "hair", "lip care", "lips"]})
    pop = np.array([3, 1, 1])  # training interactions: lips items 4 of 5
    got = behaviour_labels(pairs, {0: np.array([2, 2]), 1: np.array([0, 2])}, items, pop, vec, 0.85)
    # "lip care" matches the lips items (cosine 0.9 >= 0.85); user 1's future is half lips, below the 0.8 base.
    assert got["future"].tolist() == [0.0, 1.0, 0.0, 0.5]
    assert got["base"].tolist() == pytest.approx([0.8, 0.2, 0.8, 0.8])
    assert got["label"].tolist() == [False, True, False, False]


def test_classifier_measures_held_out_accuracy_and_auc_by_owner():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    x = rng.normal(size=(200, 4)) + 3.0 * y[:, None]  # separable along every axis
    owners = np.repeat(np.arange(40), 5)
    clf, m = fit_and_measure(x, y, owners, RLDIConfig(), seed=1)
    assert m["heldout_owners"] == 8 and m["heldout"] == 40 and m["train"] == 160
    assert m["heldout_accuracy"] == 1.0 and m["heldout_auc"] == 1.0
    assert m["heldout_majority_accuracy"] < 1.0
    mlp, m2 = fit_and_measure(x, y, owners, RLDIConfig(classifier="mlp", hidden=8), seed=1)
    assert m2["heldout_auc"] == 1.0
    with pytest.raises(ValueError, match="all False"):
        fit_and_measure(x, np.zeros(200, bool), owners, RLDIConfig(), seed=1)


def test_profiles_and_quality_use_positive_interests_only():
    vec = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    frame = pd.DataFrame(
        {
            "item_id": [0, 0, 1, 2],
            "interest": ["a", "b", "b", "a"],
            "weight": [0.3, 0.3, 1.0, 1.0],
            "confidence": [0.5, 0.5, 1.0, 1.0],
            "label": [True, True, False, True],
        }
    )
    emb = profiles(frame, "item_id", 4, vec)
    np.testing.assert_allclose(emb, [[0.70710677, 0.70710677], [0, 0], [1, 0], [0, 0]], atol=1e-6)
    assert item_quality(frame, 4).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_label_interests_offline_end_to_end(tmp_path):
    dataset = topical_dataset()
    icfg = InterestsConfig()
    items = offline_item_interests(dataset, icfg)
    cfg = RLDIConfig(holdout=3)
    summary = label_interests(dataset, items, None, icfg, cfg, tmp_path, tmp_path / "c.sqlite", toy_embed, seed=0)

    assert summary["users_mined_on_prefix"] == 60 and summary["calls"] == 0 and summary["failures"] == 0
    # Category interests predict the held-out items (users stay in one category), brands do not.
    # Brand labels are coin flips (about half of them positive), which caps the AUC well below 1.
    assert summary["heldout_auc"] > 0.65 and summary["heldout_accuracy"] > summary["heldout_majority_accuracy"]
    saved = json.loads((tmp_path / "rldi.json").read_text())
    assert saved["heldout_auc"] == summary["heldout_auc"]
    prefix = pd.read_parquet(tmp_path / "prefix_user_interests.parquet")
    train = dataset.train_sequences()
    assert (prefix["prefix_end"] == [len(train[u]) - 3 for u in prefix["user_id"]]).all()
    assert {"p_positive", "label", "behaviour_label"} <= set(prefix.columns)
    labelled = pd.read_parquet(tmp_path / "item_interests.parquet")
    by_kind = labelled.groupby(labelled["interest"].str.startswith("Sub"))["label"].mean()
    assert by_kind[True] == 1.0 and by_kind[False] < 0.5
    assert np.load(tmp_path / "item_interest_emb.npy").shape == (30, 256)
    users = np.load(tmp_path / "user_interest_emb.npy")
    assert users.shape == (60, 256) and np.allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    assert np.load(tmp_path / "item_quality.npy").shape == (30,)

    uncurated = label_interests(
        dataset, items, None, icfg, RLDIConfig(holdout=3, curate=False), tmp_path / "all", tmp_path / "c.sqlite",
        toy_embed, seed=0,
    )  # fmt: skip
    assert uncurated["item_positive_share"] == 1.0 and uncurated["heldout_auc"] == summary["heldout_auc"]


def test_held_out_items_never_reach_the_mining_or_the_labels(tmp_path):
    """Renaming the valid and test items' metadata changes nothing the stage writes."""
    dataset = topical_dataset()
    icfg = InterestsConfig()
    items = offline_item_interests(dataset, icfg)

    def run(ds: Dataset, out) -> pd.DataFrame:
        label_interests(ds, items, None, icfg, RLDIConfig(), out, tmp_path / "c.sqlite", toy_embed, seed=0)
        return pd.read_parquet(out / "prefix_user_interests.parquet")

    base = run(dataset, tmp_path / "a")
    # Swap the tail of each sequence (valid and test targets) for other items: prefixes and labels stay.
    seqs = [s.copy() for s in dataset.sequences]
    for s in seqs:
        s[-2:] = s[-2:][::-1]
    frame = pd.DataFrame(
        {
            "user_id": dataset.user_ids,
            "raw_user": dataset.raw_users,
            "item_ids": seqs,
            "timestamps": [np.arange(len(s), dtype=np.float64) for s in seqs],
            "valid_pos": dataset.valid_pos,
            "test_pos": dataset.test_pos,
        }
    )
    pd.testing.assert_frame_equal(base, run(Dataset(dataset.items, frame, 5), tmp_path / "b"))


def judge_reply(body: dict, n: int) -> Reply:
    """1 for category descriptors, 0 for brand ones; the first answer is not JSON (it is asked again)."""
    if n == 0:
        return Reply(content="Sure! Here you go.")
    listed = re.findall(r"^\d+\. (.+)$", first_user_text(body).split("mined for it:")[1], re.M)
    return Reply(content=json.dumps({"labels": [0 if "products" in d else 1 for d in listed]}))


def test_judge_labels_through_the_cache(tmp_path):
    dataset = topical_dataset()
    icfg = InterestsConfig()
    items = offline_item_interests(dataset, icfg)
    with FakeOpenAI(judge_reply) as server:
        judge = BackendConfig(name="judge", kind="openai", base_url=server.url, model="m", api_key_env="")
        cfg = RLDIConfig(labels="judge", judge=judge, test_fraction=0.3)
        summary = label_interests(dataset, items, None, icfg, cfg, tmp_path / "a", tmp_path / "c.sqlite", toy_embed, 0)
        assert summary["calls"] == 31 and summary["failures"] == 0  # 30 items + one re-ask
        assert summary["labelled"] == len(items) and summary["heldout_auc"] == 1.0
        again = label_interests(dataset, items, None, icfg, cfg, tmp_path / "b", tmp_path / "c.sqlite", toy_embed, 0)
        assert again["calls"] == 0 and again["cache_hits"] == 31 and len(server.requests) == 31
    labelled = pd.read_parquet(tmp_path / "a" / "item_interests.parquet")
    assert (labelled["label"] == ~labelled["interest"].str.contains("products")).all()


@pytest.mark.parametrize(
    "text, message",
    [('{"labels": [1, 0]}', "exactly 3"), ('{"labels": [1, 0, 2]}', "0 or 1"), ('{"labels": [true, 0, 1]}', "0 or 1")],
)
def test_judge_answers_are_validated(text, message):
    assert parse_judge('```json\n{"labels": [1, 0, 1]}\n```', 3) == [1, 0, 1]
    with pytest.raises(MalformedAnswer, match=message):
        parse_judge(text, 3)


def test_config_and_stage_inputs():
    from genrec.pipeline import STAGES, stage_inputs

    cfg = load_config(None, ["run_dir=r"])
    assert stage_inputs(STAGES["text"], cfg) == ("prepare",)
    assert stage_inputs(STAGES["sft"], cfg) == ("prepare", "sid", "text")
    cfg = load_config(
        None,
        [
            "run_dir=r",
            "text.interests=positive",
            "sft.tasks={seqrec: 1, interest2sid: 0.5}",
            "rl.rewards={rank: 1, interest: 0.1, quality: 0.5}",
        ],
    )
    assert stage_inputs(STAGES["rldi"], cfg) == ("prepare", "interests")
    assert stage_inputs(STAGES["text"], cfg) == ("prepare", "interests", "rldi")
    assert stage_inputs(STAGES["sft"], cfg) == ("prepare", "sid", "text", "rldi")
    assert stage_inputs(STAGES["rl"], cfg) == ("prepare", "sid", "sft", "rldi")
    assert stage_inputs(STAGES["text"], load_config(None, ["run_dir=r", "text.interests=all"])) == (
        "prepare",
        "interests",
    )
    with pytest.raises(ConfigError, match="rldi.labels: judge needs rldi.judge"):
        load_config(None, ["run_dir=r", "rldi.labels=judge"])
    with pytest.raises(ConfigError, match="text.interests must be"):
        load_config(None, ["run_dir=r", "text.interests=some"])
