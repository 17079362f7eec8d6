"""Interest mining end to end: offline miner, merging, failures, training-only user prompts, resuming after a kill."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import make_dataset_frames, shared_data_or_skip
from genrec.config import ConfigError, _build
from genrec.data.dataset import Dataset
from genrec.interests.backends import BackendError, make_backend
from genrec.interests.cache import CallCache
from genrec.interests.config import BackendConfig, InterestsConfig
from genrec.interests.merge import merge_all, merge_interests
from genrec.interests.miner import mine, mine_item_interests, mine_user_interests, run
from genrec.interests.offline import OfflineMiner
from genrec.interests.schema import Interest, normalize
from genrec.pipeline import Stage, StageContext
from test_interests_backends import FakeOpenAI, Reply, answer_json, echo_title, first_user_text


def toy_embed(texts: list[str]) -> np.ndarray:
    """Hashed bag of words: phrases with the same words have cosine 1, disjoint ones 0 (barring collisions)."""
    out = np.zeros((len(texts), 256))
    for i, text in enumerate(texts):
        for w in normalize(text).split():
            out[i, zlib.crc32(w.encode()) % 256] += 1.0
    return out


def llm(server: FakeOpenAI, **kw) -> BackendConfig:
    return BackendConfig(
        **{
            "name": "llm",
            "kind": "openai",
            "base_url": server.url,
            "model": "fake-model",
            "api_key_env": "",
            "max_retries": 1,
            "timeout": 5.0,
            **kw,
        }
    )


def no_sleep(seconds: float) -> None:
    pass


def catalogue() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [0, 1, 2, 3],
            "title": ["Rose lip balm", "Mint lip balm", "Argan hair oil", "Coconut hair oil"],
            "brand": ["Acme", "Acme", "Zed", ""],
            "categories": ["Beauty, Lips, Balms", "Beauty, Lips, Balms", "Beauty, Hair, Oils", "Beauty, Hair, Oils"],
            "description": ["", "", "", ""],
        }
    )


# --------------------------------------------------------------------------- offline miner and merging


def test_offline_miner_names_its_sources():
    miner = OfflineMiner(catalogue(), max_interests=10)
    got = {it.interest: it for it in miner.item_interests(0)}
    # "Beauty" is shared by the whole catalogue: not an interest. Lips/Balms/Acme: half of it.
    assert "Beauty" not in got
    assert [got[k].confidence for k in ("Lips", "Balms", "Acme products")] == [0.65, 0.65, 0.65]
    assert got["Balms"].rationale.startswith("category path segment 3 of 3 (Beauty > Lips > Balms)")
    assert "brand" in got["Acme products"].rationale
    keywords = [it for it in got.values() if "tf-idf" in it.rationale]
    assert {k.interest for k in keywords} <= {"lip", "balm", "lip balm", "rose"} and keywords
    assert not any(it.interest.endswith("products") for it in miner.item_interests(3))  # no brand
    user = {it.interest: it for it in miner.user_interests([0, 2])}
    assert user["Lips"].confidence == 0.325  # 1 of 2 items x 0.65
    assert user["Lips"].rationale == "category interest of 1 of the user's 2 training items"
    assert {it.interest: it.confidence for it in miner.user_interests([0, 1])}["Lips"] == 0.65
    assert miner.user_interests([]) == []


def test_merge_groups_by_similarity_and_weights_by_agreement():
    vectors = {
        "lip care": np.array([1.0, 0.0]),
        "lip-care products": np.array([0.96, 0.28]),
        "hair": np.array([0.0, 1.0]),
    }
    per_backend = {
        "a": [Interest("lip care", "ra", 0.8), Interest("hair", "rh", 0.6)],
        "b": [Interest("lip-care products", "rb", 0.6)],
        "failed": [],
    }
    merged = merge_interests(per_backend, vectors, threshold=0.9)
    assert [(m.interest, m.rationale, m.backends, m.agreement, m.confidence, m.weight) for m in merged] == [
        ("lip care", "ra", ("a", "b"), 1.0, 0.7, 0.7),
        ("hair", "rh", ("a",), 0.5, 0.6, 0.3),
    ]
    # Below the threshold they stay apart.
    apart = merge_interests(per_backend, vectors, threshold=0.99)
    assert [(m.interest, m.weight) for m in apart] == [("lip care", 0.4), ("hair", 0.3), ("lip-care products", 0.3)]


def test_merge_all_embeds_only_when_two_backends_answered():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return toy_embed(texts)

    answers = {
        0: {"a": [Interest("x y", "r", 0.5)]},
        1: {"a": [Interest("red lipstick", "r", 0.9)], "b": [Interest("Red  lipstick", "r", 0.5)]},
    }
    merged = merge_all(answers, embed, 0.9)
    assert calls == [["Red  lipstick", "red lipstick"]]
    assert [(m.interest, m.agreement, m.confidence) for m in merged[1]] == [("red lipstick", 1.0, 0.7)]
    assert merged[0][0].agreement == 1.0
    with pytest.raises(ValueError, match="embed_fn"):
        merge_all(answers, None, 0.9)


@pytest.mark.slow  # loads the MiniLM encoder
def test_default_embedder_separates_paraphrases_from_different_interests():
    from genrec.interests.merge import load_embedder

    threshold = InterestsConfig().merge_threshold
    vectors = load_embedder("minilm")(["lip balm", "lip balms", "lip care", "lip-care products", "hair oil"])
    assert vectors.shape == (5, 384)
    sims = vectors @ vectors.T
    assert sims[0, 1] >= threshold and sims[2, 3] >= threshold
    assert sims[0, 4] < threshold and sims[2, 4] < threshold


# --------------------------------------------------------------------------- mining with LLM backends


def category_echo(body: dict, n: int) -> Reply:
    """Answers with the item's last category segment (which the offline miner also finds) and a fan phrase."""
    text = first_user_text(body)
    if "refuse me" in text:
        return Reply(content="I'm sorry, I cannot help with that request.")
    if "explode" in text:
        return Reply(500, "internal error")
    title = re.search(r"Title: ([^;\n]+)", text).group(1)
    last_category = re.search(r"Categories: ([^;\n]+)", text).group(1).split(",")[-1].strip()
    return Reply(content=answer_json([last_category, f"fan of {title}"]), usage=(100, 20))


def test_mine_items_with_two_backends_failures_and_tokens(tmp_path):
    items, _ = make_dataset_frames(num_items=9, max_len=8)
    items.loc[3, "title"] = "refuse me"
    items.loc[5, "title"] = "explode"
    with FakeOpenAI(category_echo) as server:
        cfg = InterestsConfig(backends=[llm(server), BackendConfig()], malformed_retries=1, backoff_base=0.0)
        backends = [make_backend(b, cfg, items, no_sleep) for b in cfg.backends]
        with CallCache(tmp_path / "c.sqlite") as cache:
            result = mine_item_interests(items, backends, cache, cfg, toy_embed, progress=False)
            stats = cache.stats()
    frame = result.frame
    assert sorted(frame["item_id"].unique()) == list(range(9))  # the offline miner covers the failures
    assert sorted((f["id"], f["backend"], f["reason"]) for f in result.failures) == [
        (3, "llm", "refusal"),
        (5, "llm", "http_500"),
    ]
    # Item 0: both backends found "Sub0" (agreement 1); the rest came from one of the two.
    item0 = frame[frame["item_id"] == 0].set_index("interest")
    assert list(item0.loc["Sub0", "backends"]) == ["llm", "offline-metadata"]
    assert item0.loc["Sub0", "agreement"] == 1.0
    assert item0.loc["fan of item 0 title", "agreement"] == 0.5
    assert item0["rank"].tolist() == list(range(len(item0)))
    assert (np.diff(item0["weight"].to_numpy()) <= 0).all()
    failed = frame[frame["item_id"] == 3]
    assert {tuple(b) for b in failed["backends"]} == {("offline-metadata",)} and (failed["agreement"] == 1.0).all()
    # 7 good items, the refusal asked twice (once corrected), the 500 retried once and never
    # answered: 10 questions to the backend (misses), 9 answers, 11 HTTP requests.
    assert server.ok == 9 and len(server.requests) == 11
    assert (stats["misses"], stats["hits"], stats["failures"]) == (10, 0, 2)
    assert stats["prompt_tokens"] == 7 * 100 + 2 * 11 and stats["completion_tokens"] == 7 * 20 + 2 * 7


def test_identical_items_make_one_call(tmp_path):
    items = catalogue()
    items.loc[1] = items.loc[0].to_dict() | {"item_id": 1}
    with FakeOpenAI(category_echo) as server:
        cfg = InterestsConfig(backends=[llm(server, max_concurrency=4)])
        backends = [make_backend(cfg.backends[0], cfg, items, no_sleep)]
        with CallCache(tmp_path / "c.sqlite") as cache:
            frame = mine_item_interests(items, backends, cache, cfg, progress=False).frame
            stats = cache.stats()
    assert server.ok == 3 and (stats["misses"], stats["hits"]) == (3, 1)
    assert frame[frame.item_id == 0]["interest"].tolist() == frame[frame.item_id == 1]["interest"].tolist()


def test_refused_credentials_stop_mining(tmp_path):
    items, _ = make_dataset_frames(num_items=30)
    with FakeOpenAI(lambda body, n: Reply(401, "invalid api key")) as server:
        cfg = InterestsConfig(backends=[llm(server, max_concurrency=2)])
        backends = [make_backend(cfg.backends[0], cfg, items, no_sleep)]
        with CallCache(tmp_path / "c.sqlite") as cache, pytest.raises(BackendError, match="credentials refused"):
            mine_item_interests(items, backends, cache, cfg, progress=False)
    assert len(server.requests) < 10  # the questions not yet asked were dropped, not all 30 asked


def test_user_prompts_hold_exactly_the_training_history(tmp_path):
    items, sequences = make_dataset_frames(num_users=12, num_items=30, seed=3)
    items["title"] = [f"product {chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(len(items))]
    dataset = Dataset(items, sequences, max_history=5)
    with FakeOpenAI(echo_title) as server:
        cfg = InterestsConfig(backends=[llm(server, max_concurrency=3)], user_history=4)
        backends = [make_backend(cfg.backends[0], cfg, items, no_sleep)]
        with CallCache(tmp_path / "c.sqlite") as cache:
            result = mine_user_interests(dataset, backends, cache, cfg, progress=False)
    asked = sorted(tuple(re.findall(r"Title: ([^;\n]+)", first_user_text(r["body"]))) for r in server.requests)
    want = sorted(tuple(items["title"][i] for i in seq[-4:]) for seq in dataset.train_sequences())
    assert asked == want
    assert sorted(result.frame["user_id"].unique()) == list(range(12)) and not result.failures


CHILD = """
import sys
from genrec.data.dataset import Dataset
from genrec.interests.config import BackendConfig, InterestsConfig
from genrec.interests.miner import mine

url, data, out, cache = sys.argv[1:5]
llm = BackendConfig(name="llm", kind="openai", base_url=url, model="fake-model", api_key_env="", max_concurrency=1)
mine(Dataset.load(data), InterestsConfig(backends=[llm], mine=["items"]), out, cache, progress=False)
"""


def test_killed_mining_resumes_without_repeating_a_call(tmp_path):
    n = 10
    items, sequences = make_dataset_frames(num_users=5, num_items=n, max_len=8)
    (tmp_path / "data").mkdir()
    items.to_parquet(tmp_path / "data" / "items.parquet")
    sequences.to_parquet(tmp_path / "data" / "sequences.parquet")
    release, killed = threading.Event(), threading.Event()

    def reply(body, k):
        # The first half is answered; the next question hangs until the miner is killed.
        if k >= n // 2 and not killed.is_set():
            release.wait(60)
            return Reply(503, "gone")
        return echo_title(body, k)

    cache_path = tmp_path / "cache" / "calls.sqlite"
    with FakeOpenAI(reply) as server:
        args = [server.url, tmp_path / "data", tmp_path / "out1", cache_path]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 90
        while len(server.requests) <= n // 2 and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.kill()
        child.wait()
        killed.set()
        release.set()
        assert server.ok == n // 2 and not (tmp_path / "out1" / "item_interests.parquet").exists()

        cfg = InterestsConfig(backends=[llm(server)], mine=["items"])
        summary = mine(
            Dataset.load(tmp_path / "data"), cfg, tmp_path / "out2", cache_path, sleep=no_sleep, progress=False
        )
    assert (summary["cache_hits"], summary["calls"]) == (n // 2, n // 2)
    assert server.ok == n and len({json.dumps(b, sort_keys=True) for b in server.ok_bodies}) == n
    frame = pd.read_parquet(tmp_path / "out2" / "item_interests.parquet")
    assert sorted(frame["item_id"].unique()) == list(range(n))
    stats = json.loads((tmp_path / "out2" / "mining.json").read_text())["cache"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (n // 2, n // 2, n)


# --------------------------------------------------------------------------- the stage


def vision_or_echo(body: dict, n: int) -> Reply:
    content = body["messages"][0]["content"]
    if isinstance(content, list):
        assert content[1]["image_url"]["url"].startswith(("data:image/png;base64,", "https://"))
        return Reply(content="A red bottle with a pump.")
    return echo_title(body, n)


def test_stage_writes_outputs_captions_and_keeps_the_cache_outside(tmp_path):
    items, sequences = make_dataset_frames(num_users=6, num_items=8, max_len=7)
    items["image"] = ["" for _ in range(8)]
    items.loc[2, "image"] = "imgs/2.png"
    items.loc[4, "image"] = "https://example.org/4.jpg"
    (tmp_path / "raw" / "imgs").mkdir(parents=True)
    (tmp_path / "raw" / "imgs" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "prepare").mkdir(parents=True)
    items.to_parquet(run_dir / "prepare" / "items.parquet")
    sequences.to_parquet(run_dir / "prepare" / "sequences.parquet")
    (run_dir / "prepare" / "done.json").write_text("{}")
    with FakeOpenAI(vision_or_echo) as server:
        cfg = InterestsConfig(backends=[llm(server)], vision=llm(server, name="vlm"), max_users=4)
        run_cfg = SimpleNamespace(interests=cfg, data=SimpleNamespace(max_history=5, path=str(tmp_path / "raw")))
        stage = Stage("interests", "genrec.interests.miner:run", ("interests",), ("prepare",))
        out = tmp_path / "out"
        summary = run(StageContext(cfg=run_cfg, run_dir=run_dir, stage=stage, out=out, work=tmp_path / "work"))
    assert summary["items"]["with_interests"] == 8 and summary["users"]["total"] == 4
    assert summary["calls"] == 2 + 8 + 4 and not summary["failures"]
    item_prompts = [first_user_text(r["body"]) for r in server.requests]
    captioned = [p for p in item_prompts if p.startswith("A product:") and "Image: A red bottle with a pump." in p]
    assert len(captioned) == 2
    assert (tmp_path / "runs" / ".cache" / "interests" / "calls.sqlite").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "failures.json",
        "item_interests.parquet",
        "mining.json",
        "user_interests.parquet",
    ]
    users = pd.read_parquet(out / "user_interests.parquet")
    assert list(users.columns) == [
        "user_id",
        "rank",
        "interest",
        "rationale",
        "confidence",
        "backends",
        "agreement",
        "weight",
    ]
    assert sorted(users["user_id"].unique()) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- config


def test_config_loads_strictly():
    cfg = _build(
        InterestsConfig,
        {
            "backends": [
                {"name": "vllm", "kind": "openai", "base_url": "http://h:8000/v1", "model": "qwen"},
                {"kind": "offline"},
            ],
            "vision": {"name": "vlm", "kind": "openai", "base_url": "http://h/v1", "model": "v"},
        },
    )
    assert [b.name for b in cfg.backends] == ["vllm", "offline-metadata"] and cfg.vision.model == "v"
    with pytest.raises(ConfigError, match="backends\\[0\\].temprature"):
        _build(InterestsConfig, {"backends": [{"kind": "offline", "temprature": 0.1}]}, "interests.")
    with pytest.raises(ConfigError, match="needs base_url"):
        BackendConfig(name="x", kind="openai", model="m")
    with pytest.raises(ConfigError, match="kind must be one of"):
        BackendConfig(kind="claude")
    with pytest.raises(ConfigError, match="names must be unique"):
        InterestsConfig(backends=[BackendConfig(), BackendConfig()])
    with pytest.raises(ConfigError, match="vision must be kind openai"):
        InterestsConfig(vision=BackendConfig())
    with pytest.raises(ConfigError, match="interests.mine"):
        InterestsConfig(mine=["sessions"])


@pytest.mark.shared_data
def test_offline_miner_on_beauty():
    path = shared_data_or_skip("amazon-beauty-2014-5core") / "Beauty.item.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    items = pd.DataFrame([raw[str(i)] for i in range(len(raw))])
    miner = OfflineMiner(items)
    found = [miner.item_interests(i) for i in range(len(items))]
    assert all(found)  # every item has categories
    assert not any(it.interest == "Beauty" for per in found for it in per)
    assert all(0 <= it.confidence <= 1 and it.rationale for per in found for it in per)
