"""Quantisers, collision resolution, quality numbers and the sid stage, on tiny synthetic embeddings."""

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.config import RunConfig, SIDConfig
from genrec.io import read_json
from genrec.sid.collisions import collision_stats, dedup_level, nearest_free, resolve_collisions
from genrec.sid.kmeans import ResidualKMeans, capacity_assign
from genrec.sid.quality import category_labels, code_usage, coherence
from genrec.sid.stage import assign_codes, build_sids, load_quantizer
from genrec.sid.trie import SIDTrie

torch.set_num_threads(1)

QUANTIZERS = ["rkmeans", "rkmeans_balanced", "rqvae"]
# Plain residual k-means runs on the raw 16-d embeddings, the balanced one on an 8-d PCA projection.
PCA_DIM = {"rkmeans": 0, "rkmeans_balanced": 8, "rqvae": 0}


def synthetic(n: int = 600, dim: int = 16, topics: int = 6, seed: int = 0):
    """Unit-norm embeddings around ``topics`` centres, and a category path per item naming its topic."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, topics, n)
    x = rng.normal(size=(topics, dim))[topic] + 0.8 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"Shop, Topic{t}, Leaf" for t in topic]


def small_cfg(quantizer: str, collision: str = "dedup", **kw) -> SIDConfig:
    kw.setdefault("pca_dim", PCA_DIM[quantizer])
    return SIDConfig(
        quantizer=quantizer,
        levels=3,
        codebook_size=8,
        collision=collision,
        kmeans_iters=10,
        rqvae_hidden=[32],
        rqvae_latent=8,
        rqvae_epochs=15,
        rqvae_batch_size=128,
        **kw,
    )


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def built(data):
    x, cats = data
    return {q: build_sids(x, small_cfg(q), seed=7, categories=cats) for q in QUANTIZERS}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_dedup_codes_are_unique_and_reported(built, quantizer):
    codes, quality, _ = built[quantizer]
    assert codes.shape == (600, 4) and codes.dtype == np.int64
    assert len(np.unique(codes, axis=0)) == 600 and quality["unique_after"]
    sizes = quality["codebook_sizes"]
    assert sizes[:3] == [8, 8, 8] and sizes[3] == quality["resolution"]["before"]["max_group"]
    assert (codes < np.array(sizes)).all()
    assert 0.0 <= quality["collision_rate"] < 1.0 and 0.0 < quality["recon_rel"] < 1.0
    assert quality["usage"][0]["utilisation"] > 0.5
    # Items of one topic share first-level codes far more often than random pairs.
    assert quality["coherence"]["category_element"] == 1 and quality["coherence"]["lift"] > 1.5
    SIDTrie(codes, sizes)  # a valid trie: the codes are what the decoder will use


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_same_seed_same_codes_and_save_load_reencodes_identically(built, data, quantizer, tmp_path):
    x, cats = data
    codes, _, fitted = built[quantizer]
    again, _, _ = build_sids(x, small_cfg(quantizer), seed=7, categories=cats)
    np.testing.assert_array_equal(codes, again)
    path = tmp_path / ("quantizer.pt" if quantizer == "rqvae" else "quantizer.npz")
    fitted.save(path)
    loaded = load_quantizer(path)
    reencoded, before, _, _ = assign_codes(loaded, x, small_cfg(quantizer))
    np.testing.assert_array_equal(reencoded, codes)
    np.testing.assert_array_equal(before, fitted.encode(x))


def test_another_seed_gives_other_codes(data):
    x, _ = data
    a, _, _ = build_sids(x, small_cfg("rkmeans"), seed=1)
    b, _, _ = build_sids(x, small_cfg("rkmeans"), seed=2)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("quantizer", ["rkmeans", "rqvae"])
def test_sinkhorn_keeps_the_length_and_makes_codes_unique(quantizer):
    x, _ = synthetic(n=300, seed=3)
    codes, quality, q = build_sids(x, small_cfg(quantizer, "sinkhorn"), seed=0)
    assert codes.shape == (300, 3) and quality["codebook_sizes"] == [8, 8, 8]
    assert len(np.unique(codes, axis=0)) == 300
    res = quality["resolution"]
    assert res["strategy"] == "sinkhorn" and res["before"]["collision_rate"] > 0
    # Only items that collided move, and there are at most as many as collided.
    assert (codes != q.encode(x)).any(axis=1).sum() <= res["before"]["items_in_collisions"] * 300


def test_item_level_appends_the_item_id_under_the_semantic_prefix(data):
    x, _ = data
    codes, quality, q = build_sids(x, small_cfg("rkmeans", "item", pca_dim=0), seed=0)
    assert codes.shape == (600, 4) and quality["codebook_sizes"] == [8, 8, 8, 600]
    np.testing.assert_array_equal(codes[:, :3], q.encode(x))  # the semantic prefix is left as it was
    assert codes[:, 3].tolist() == list(range(600)) and quality["resolution"]["strategy"] == "item"
    trie = SIDTrie(codes, quality["codebook_sizes"])
    assert (trie.transitions[3] >= 0).sum() == 600  # each item is one leaf, under its own prefix only


def test_balanced_kmeans_caps_cluster_sizes(data):
    x, _ = data
    q = ResidualKMeans(levels=2, codebook_size=8, iters=5, seed=0, balanced=True).fit(x)
    codes = q.encode(x)
    for t in range(2):
        assert np.bincount(codes[:, t], minlength=8).max() <= 75  # ceil(600 / 8)
    plain = ResidualKMeans(levels=2, codebook_size=8, iters=5, seed=0).fit(x).encode(x)
    assert np.bincount(plain[:, 0]).std() > np.bincount(codes[:, 0]).std()


def test_capacity_assign_by_hand():
    cost = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 0.5]])
    # Everyone prefers column 0 except item 2; with capacity 1 item 0 (cheapest) keeps column 0,
    # item 2 takes column 1 in the same round, and item 1 finds both full -> impossible.
    with pytest.raises(ValueError, match="cannot hold"):
        capacity_assign(cost, 1)
    assert capacity_assign(cost, 2).tolist() == [0, 0, 1]
    assert capacity_assign(np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]), 2).tolist() == [0, 0, 1]  # ties: item order


def test_dedup_level_ranks_by_reconstruction_error():
    codes = np.array([[0, 0], [0, 0], [1, 0], [0, 0]])
    out, size = dedup_level(codes, np.array([2.0, 1.0, 0.0, 1.0]))
    assert out[:, 2].tolist() == [2, 0, 0, 1] and size == 3  # ties (items 1, 3) by item_id
    assert collision_stats(codes) == {
        "n_items": 4,
        "n_distinct": 2,
        "collision_rate": 0.5,
        "items_in_collisions": 0.75,
        "max_group": 3,
    }


def hand_kmeans() -> ResidualKMeans:
    """1-d residual k-means with level-0 centroids {0, 10} and level-1 centroids {0, 1}."""
    q = ResidualKMeans(levels=2, codebook_size=2)
    q.codebooks = np.array([[[0.0], [10.0]], [[0.0], [1.0]]], dtype=np.float32)
    return q


def test_nearest_free_by_hand():
    q = hand_kmeans()
    x = np.array([[0.0], [0.1], [0.2], [10.0]], dtype=np.float32)
    codes = q.encode(x)
    assert codes.tolist() == [[0, 0], [0, 0], [0, 0], [1, 0]]
    moved, n_moved = nearest_free(q, x, codes)
    # Item 1 finds (0, 1) free under its prefix; item 2 must leave prefix (0,) and takes the free (1, 1).
    assert moved.tolist() == [[0, 0], [0, 1], [1, 1], [1, 0]] and n_moved == 2
    with pytest.raises(ValueError, match="cannot have distinct SIDs"):
        nearest_free(q, np.zeros((5, 1), np.float32), np.zeros((5, 2), np.int64))
    out, sizes, info = resolve_collisions(q, x, codes, "sinkhorn")
    assert len(np.unique(out, axis=0)) == 4 and sizes == [2, 2] and info["before"]["collision_rate"] == 0.5


def test_quality_numbers_by_hand():
    usage = code_usage(np.array([[0], [0], [1], [1]]), [4])[0]
    assert usage["used"] == 2 and usage["utilisation"] == 0.5 and usage["perplexity"] == pytest.approx(2.0)
    assert code_usage(np.array([[3], [3]]), [4])[0]["perplexity"] == pytest.approx(1.0)
    assert category_labels(["Beauty, Makeup, Face", "Beauty, Skin", "Beauty"]) == (["Makeup", "Skin", None], 1)
    assert category_labels(["Tools,Drills", "Lab,Tweezers", ""]) == (["Tools", "Lab", None], 0)
    c = coherence(np.array([0, 0, 1, 1]), ["A", "A", "A", "B"])
    # Same-code pairs: (0,1) same, (2,3) not -> 1/2; all 6 pairs, 3 of them within A -> 1/2.
    assert c["same_category_same_code"] == 0.5 and c["same_category_random"] == 0.5 and c["lift"] == 1.0


def test_bad_embeddings_and_sizes_are_errors(data):
    x, _ = data
    with pytest.raises(ValueError, match=r"sid.codebook_size=8 needs at least 8 items, got 5: lower sid.codebook_size"):
        build_sids(x[:5], small_cfg("rkmeans"), seed=0)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values, e.g. item 3"):
        build_sids(bad, small_cfg("rkmeans"), seed=0)
    bad = x.copy()
    bad[4] = 0.0
    with pytest.raises(ValueError, match="zero norm, e.g. item 4"):
        build_sids(bad, small_cfg("rkmeans"), seed=0)
    with pytest.raises(ValueError, match="512 SIDs for 600 items.*sid.collision=dedup"):
        build_sids(x, small_cfg("rkmeans", "sinkhorn"), seed=0)
    with pytest.raises(ValueError, match=r"sid.pca_dim=32 exceeds min\(items, embedding dimension\) = 16"):
        build_sids(x, small_cfg("rkmeans", pca_dim=32), seed=0)
    with pytest.raises(ValueError, match="3 category paths for 600"):
        build_sids(x, small_cfg("rkmeans"), seed=0, categories=["a", "b", "c"])


def _sid_run_dir(tmp_path, x, cats):
    run_dir = tmp_path / "run"
    for name in ("embed", "prepare"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "done.json").write_text("{}")
    np.save(run_dir / "embed" / "item_emb.npy", x)
    pd.DataFrame(
        {"item_id": np.arange(len(x)), "raw_id": [str(i) for i in range(len(x))], "categories": cats}
    ).to_parquet(run_dir / "prepare" / "items.parquet")
    return run_dir


def _run_sid(tmp_path, run_dir, **kw):
    from genrec.pipeline import STAGES, StageContext
    from genrec.sid.stage import run

    cfg = RunConfig(run_dir=str(run_dir), seed=5, sid=small_cfg("rkmeans", **kw))
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    summary = run(StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["sid"], out=out, work=tmp_path / "work"))
    return np.load(out / "codes.npy"), summary, out


def test_stage_writes_codes_quantizer_and_quality(tmp_path, data, capsys):
    x, cats = data
    run_dir = _sid_run_dir(tmp_path, x, cats)
    codes, summary, out = _run_sid(tmp_path, run_dir)
    assert codes.shape == (600, 4) and len(np.unique(codes, axis=0)) == 600
    assert read_json(out / "codebook_sizes.json") == summary["codebook_sizes"]
    quality = read_json(out / "quality.json")
    assert quality["collision_rate"] == pytest.approx(summary["collision_rate"], abs=1e-5)
    assert "collision rate before resolution" in capsys.readouterr().out
    reencoded, *_ = assign_codes(load_quantizer(out / "quantizer.npz"), x, small_cfg("rkmeans"))
    np.testing.assert_array_equal(reencoded, codes)


def test_stage_quantises_sasrec_item_embeddings(tmp_path, data):
    """sid.embedding=sasrec reads the item rows of sasrec/model.pt (not its padding row); text+sasrec both."""
    from genrec.baselines.sasrec import SASRec
    from genrec.text.encode import unit_rows

    x, cats = data
    run_dir = _sid_run_dir(tmp_path, x, cats)
    sasrec = SASRec(num_items=600, max_len=5, hidden_size=16, num_layers=1, num_heads=1)
    with torch.no_grad():  # the items' own embeddings: the text ones, reversed in each row
        sasrec.item_emb.weight[1:] = torch.as_tensor(x[:, ::-1].copy())
        sasrec.item_emb.weight[0] = 100.0
    (run_dir / "sasrec").mkdir()
    sasrec.save(run_dir / "sasrec" / "model.pt")
    with pytest.raises(FileNotFoundError, match="needs stage 'sasrec'"):
        _run_sid(tmp_path, tmp_path / "run", embedding="sasrec")
    (run_dir / "sasrec" / "done.json").write_text("{}")

    codes, summary, _ = _run_sid(tmp_path, run_dir, embedding="sasrec")
    assert summary["embedding"] == "sasrec"
    expected, *_ = build_sids(x[:, ::-1], small_cfg("rkmeans"), seed=5)
    np.testing.assert_array_equal(codes, expected)

    both, *_ = _run_sid(tmp_path, run_dir, embedding="text+sasrec")
    joined = np.concatenate([unit_rows(x), unit_rows(x[:, ::-1])], axis=1)
    np.testing.assert_array_equal(both, build_sids(joined, small_cfg("rkmeans"), seed=5)[0])

    sasrec_small = SASRec(num_items=599, max_len=5, hidden_size=16, num_layers=1, num_heads=1)
    sasrec_small.save(run_dir / "sasrec" / "model.pt")
    with pytest.raises(ValueError, match="model.pt has 599 item rows but the dataset has 600 items"):
        _run_sid(tmp_path, run_dir, embedding="sasrec")
    with pytest.raises(ValueError, match="sid.embedding must be one of text, sasrec, text\\+sasrec, got 'cf'"):
        small_cfg("rkmeans", embedding="cf")
