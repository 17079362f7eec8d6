"""DeepRec's preference-aware TRM: phrases, retrieval, steering by text, resume, config and the stage."""

import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_dataset_frames
from genrec.agent.trm import (
    ItemPhrases,
    PhraseEncoder,
    PreferenceTRM,
    Retriever,
    item_phrases,
    preference_phrases,
    sample_preferences,
    split_preference,
    train_trm,
)
from genrec.config import ConfigError, TRMConfig, load_config
from genrec.data.dataset import Dataset

torch.set_num_threads(1)

DIM = 16
GROUPS = 8


def fake_encode(texts: list[str]) -> np.ndarray:
    """A deterministic random vector per text (the same text always gives the same vector)."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM) for t in texts]).astype(np.float32)


def grouped_dataset(num_users: int = 60, num_items: int = 40) -> Dataset:
    """Random sequences over items whose one informative label is their group G0..G7 ("Cat" is on every item)."""
    items, sequences = make_dataset_frames(num_users=num_users, num_items=num_items, min_len=6, max_len=12, seed=3)
    items["categories"] = [f"Cat, G{i % GROUPS}" for i in range(num_items)]
    return Dataset(items, sequences, max_history=5)


def item_text_emb(dataset: Dataset) -> np.ndarray:
    """Item text embeddings near their group label's embedding, as a sentence encoder would put them."""
    rng = np.random.default_rng(0)
    labels = [c.split(", ")[1] for c in dataset.items["categories"]]
    emb = fake_encode(labels) + 0.3 * rng.normal(size=(len(labels), DIM)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def small_cfg(**kw) -> TRMConfig:
    base = dict(
        hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, lr=5e-3, batch_size=16, max_epochs=4, eval_every=2
    )
    return TRMConfig(**{**base, **kw})


def retriever_for(dataset: Dataset, model: PreferenceTRM) -> Retriever:
    cats = dataset.items["categories"].tolist()
    return Retriever(model, PhraseEncoder(fake_encode), dataset.titles, cats, max_phrases=4, phrase_chars=64)


# --------------------------------------------------------------------------- phrases


def test_split_preference_literals():
    assert split_preference("Drama; Romance ;") == ["Drama", "Romance"]
    assert split_preference("  ; ;\n ") == [] and split_preference("") == [] and split_preference(None) == []
    assert split_preference("Drama;drama; DRAMA ;War") == ["Drama", "War"]
    assert split_preference("a; b; c; d; e; f", max_phrases=4) == ["a", "b", "c", "d"]
    assert split_preference("feel-good   movies\nof the eighties", phrase_chars=10) == ["feel-good", "of the"]
    assert split_preference("abcdefghijkl", phrase_chars=8) == ["abcdefgh"]


def test_preference_phrases_are_the_informative_labels():
    cats = ["Movies, Drama, Romance", "Movies, Horror", "Movies", "Horror, Drama"]
    assert preference_phrases(cats, 0.5) == [("Drama", "Romance"), ("Horror",), (), ("Horror", "Drama")]
    phrases = item_phrases(preference_phrases(cats, 0.5), fake_encode)
    assert phrases.phrases == ["Drama", "Horror", "Romance"]
    assert phrases.ids.tolist() == [[0, 2], [1, -1], [-1, -1], [1, 0]]
    np.testing.assert_allclose(phrases.emb[1], fake_encode(["Horror"])[0])


def test_phrase_encoder_embeds_each_phrase_once_and_normalises():
    calls = []
    enc = PhraseEncoder(lambda texts: calls.append(list(texts)) or fake_encode(texts))
    a = enc.encode(["Drama", "War", "Drama"])
    b = enc.encode(["War", "Comedy"])
    assert calls == [["Drama", "War"], ["Comedy"]]
    assert a.shape == (3, DIM) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a[1], b[0])


def test_sample_preferences_draws_non_empty_subsets_of_the_targets_own_phrases():
    emb = torch.eye(3)  # phrase j is the j-th unit vector: a row's support is its subset
    ids = torch.tensor([[0, 1, 2], [2, -1, -1], [-1, -1, -1]])
    torch.manual_seed(0)
    targets = torch.tensor([0, 1, 2] * 50)
    pref = sample_preferences(targets, ids, emb, text_dropout=0.0, dim=3)
    support = pref > 0
    assert support[targets == 0].any(1).all() and support[targets == 0].sum(1).min() >= 1
    assert (support[targets == 0].sum(1) < 3).any()  # subsets, not always all three
    assert torch.equal(pref[targets == 1], torch.tensor([[0.0, 0.0, 1.0]]).expand(50, 3))
    assert torch.equal(pref[targets == 2], torch.zeros(50, 3))  # no phrases: no preference
    np.testing.assert_allclose(pref[targets == 0].norm(dim=1), 1.0, rtol=1e-6)
    assert torch.equal(sample_preferences(targets, ids, emb, text_dropout=1.0, dim=3), torch.zeros(150, 3))


# --------------------------------------------------------------------------- retrieval


def test_retrieve_is_sorted_excludes_items_and_treats_empty_text_as_none():
    dataset = grouped_dataset()
    torch.manual_seed(0)
    model = PreferenceTRM(item_text_emb(dataset), max_len=5, hidden_size=16, num_layers=1, num_heads=2).eval()
    r = retriever_for(dataset, model)
    histories = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([5])]
    exclude = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(36)]
    ids, scores = r.retrieve(histories, ["G1; G2", None, ""], 10, exclude=exclude)
    assert ids.shape == scores.shape == (3, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert not np.isin(ids[0], exclude[0]).any()
    assert (np.diff(scores[:2], axis=1) <= 0).all()
    # Only items 36..39 are left for the third row; the rest is padding.
    assert set(ids[2, :4].tolist()) == {36, 37, 38, 39} and (ids[2, 4:] == -1).all()
    assert np.isneginf(scores[2, 4:]).all()
    # None, "" and a preference with no usable phrase all mean "no text".
    plain = model.score(histories)
    for empty in (None, "", " ; ;"):
        torch.testing.assert_close(r.score(histories, [empty] * 3), plain)
    torch.testing.assert_close(r.score(histories), plain)
    assert not torch.allclose(r.score(histories, ["G1"] * 3), plain)
    # The scores are the catalogue scores at the returned ids, one batched forward for the rows.
    full = r.score(histories, ["G1; G2", None, ""]).numpy()
    np.testing.assert_allclose(scores[0], full[0, ids[0]], rtol=1e-6)
    with pytest.raises(ValueError, match="n must be in"):
        r.retrieve(histories, [None] * 3, 41)


# --------------------------------------------------------------------------- training


def test_text_steers_retrieval_towards_the_phrase(tmp_path):
    dataset = grouped_dataset()
    labels = preference_phrases(dataset.items["categories"].tolist(), 0.5)
    phrases = item_phrases(labels, fake_encode)
    cfg = small_cfg(max_epochs=12, eval_every=4, patience=10, text_dropout=0.3, batch_size=8)
    model, curves = train_trm(dataset, item_text_emb(dataset), phrases, cfg, 5, seed=0, work_dir=tmp_path)
    assert curves[-1]["loss_with_text"] < curves[0]["loss_with_text"]
    r = retriever_for(dataset, model)
    valid = dataset.examples("valid")

    def recall(prefs):
        ids, _ = r.retrieve(valid.histories, prefs, 5, exclude=valid.seen)
        return float((ids == valid.targets[:, None]).any(1).mean())

    own = recall([f"G{t % GROUPS}" for t in valid.targets])
    none = recall([None] * len(valid))
    wrong = recall([f"G{(t + 1) % GROUPS}" for t in valid.targets])
    # The sequences are random, so only the phrase says where the target is: 5 of its group's 5 items.
    assert own > 0.6 and own > none + 0.3 and wrong < none + 0.05, (own, none, wrong)


def test_resume_after_an_interruption_gives_identical_weights(tmp_path):
    dataset = grouped_dataset(num_users=30)
    phrases = item_phrases(preference_phrases(dataset.items["categories"].tolist(), 0.5), fake_encode)
    emb = item_text_emb(dataset)
    cfg = small_cfg(max_epochs=4, eval_every=1, patience=100, dropout=0.2)
    m1, curves1 = train_trm(dataset, emb, phrases, cfg, 5, seed=1, work_dir=tmp_path / "a")
    # Stop after 2 epochs, then resume to 4: same losses, same weights (dropout and phrase draws included).
    train_trm(dataset, emb, phrases, small_cfg(**{**cfg.__dict__, "max_epochs": 2}), 5, 1, tmp_path / "b")
    m2, curves2 = train_trm(dataset, emb, phrases, cfg, 5, seed=1, work_dir=tmp_path / "b")
    assert [r["loss"] for r in curves1] == [r["loss"] for r in curves2]
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_save_load_round_trip(tmp_path):
    dataset = grouped_dataset(num_users=10)
    torch.manual_seed(0)
    model = PreferenceTRM(item_text_emb(dataset), max_len=5, hidden_size=16, num_layers=1, num_heads=2).eval()
    model.save(tmp_path / "m.pt")
    loaded = PreferenceTRM.load(tmp_path / "m.pt")
    pref = torch.from_numpy(fake_encode(["G3", "G4"]))
    torch.testing.assert_close(loaded.score([np.array([1, 2]), np.array([3])], pref), model.score([[1, 2], [3]], pref))


def test_mismatched_phrase_and_item_embeddings_are_errors(tmp_path):
    dataset = grouped_dataset(num_users=10)
    bad = ItemPhrases(["G0"], np.ones((1, DIM + 1), dtype=np.float32), np.zeros((dataset.num_items, 1), np.int64))
    with pytest.raises(ValueError, match="same encoder"):
        train_trm(dataset, item_text_emb(dataset), bad, small_cfg(), 5, 0, tmp_path)


# --------------------------------------------------------------------------- config and stage


@pytest.mark.parametrize(
    "override, message",
    [
        ("trm.temperature=0", "trm.temperature must be > 0"),
        ("trm.num_heads=3", r"trm.hidden_size \(64\) must be a positive multiple of trm.num_heads \(3\)"),
        ("trm.text_dropout=1.5", r"trm.text_dropout must be in \[0, 1\]"),
        ("trm.max_label_share=0", r"trm.max_label_share must be in \(0, 1\]"),
        ("trm.max_phrases=0", "trm.max_phrases must be >= 1"),
        ("trm.patience=0", "trm.patience must be >= 1"),
        ("trm.hiden_size=3", "unknown config key trm.hiden_size"),
        ("trm.lr=fast", "trm.lr: expected a number"),
    ],
)
def test_bad_trm_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["run_dir=r", override])


def test_trm_stage_with_minilm_writes_model_eval_and_steer(tmp_path):
    from genrec.io import read_json
    from genrec.pipeline import run_stage

    items, sequences = make_dataset_frames(num_users=30, num_items=24, min_len=6, max_len=10, seed=1)
    genres = ["Drama", "Comedy", "Horror", "Western"]
    items["categories"] = [f"Movies, {genres[i % 4]}" for i in range(len(items))]
    items[["raw_id", "title", "categories"]].rename(columns={"raw_id": "item_id"}).to_csv(
        tmp_path / "toy.item.csv", index=False
    )
    rows = [(u, f"i{i}", t) for u, seq in enumerate(sequences["item_ids"]) for t, i in enumerate(seq)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=5).to_csv(
        tmp_path / "toy.inter.csv", index=False
    )
    run_dir = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "data.format=csv",
            f"data.path={tmp_path}",
            "data.name=toy",
            "data.kcore=0",
            "data.max_history=5",
            "text.template=title_categories",
            "embed.device=cpu",
            "eval.bootstrap=0",
            "trm.hidden_size=16",
            "trm.num_layers=1",
            "trm.max_epochs=2",
            "trm.eval_every=1",
            "trm.batch_size=32",
        ],
    )
    record = run_stage(cfg, "trm")
    out = run_dir / "trm"
    for name in ("model.pt", "curves.json", "steer.json", "eval/metrics.json", "eval/predictions.parquet"):
        assert (out / name).is_file(), name
    metrics = read_json(out / "eval" / "metrics.json")
    assert metrics["model"] == "trm" and metrics["test"]["users"] == 30
    assert record["summary"]["test_ndcg@10"] == metrics["test"]["ndcg@10"] and record["summary"]["epochs"] == 2
    steer = read_json(out / "steer.json")
    assert steer["users"] == 30 and 0 <= steer["recall@20_own"] <= 1
    assert set(record["summary"]) >= {"recall@20_none", "recall@20_own", "recall@20_other", "train_seconds"}
    # The agent's entry point: everything from the run directory, phrases through the real MiniLM.
    r = Retriever.load(run_dir)
    ids, scores = r.retrieve([np.array([0, 1, 2])], ["Drama; Comedy"], 5, exclude=[np.array([0, 1, 2])])
    assert ids.shape == (1, 5) and not np.isin(ids, [0, 1, 2]).any() and np.isfinite(scores).all()
    assert r.titles[0] and r.categories[0].startswith("Movies")
