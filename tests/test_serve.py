"""The HTTP service over a tiny real run: validation, auth, limits, micro-batching, overload, shutdown, fuzzing."""

from __future__ import annotations

import asyncio
import collections
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from conftest import make_dataset_frames
from genrec.config import ConfigError
from genrec.serve.app import ServerThread, create_app
from genrec.serve.batching import MicroBatcher, ShuttingDown
from genrec.serve.config import ServeConfig, load_serve_config
from genrec.serve.service import Query, load_service

KEY = "test-key-123"
NUM_ITEMS, CODEBOOK, LEVELS = 30, 4, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_run(run_dir, tasks=()):
    """prepare/items.parquet and a tiny untrained sft/model (a real GenerativeRecommender) with these task heads."""
    from genrec.config import ModelConfig
    from genrec.model.backbone import build_scratch_model
    from genrec.model.prompt import PromptFormat
    from genrec.model.recommender import GenerativeRecommender
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.model.vocab import SIDVocab
    from genrec.sid.trie import SIDTrie

    items, _ = make_dataset_frames(num_items=NUM_ITEMS)
    items.loc[29, "title"] = items.loc[28, "title"]  # two items share a title
    (run_dir / "prepare").mkdir(parents=True)
    items.to_parquet(run_dir / "prepare" / "items.parquet", index=False)

    flat = np.random.default_rng(0).choice(CODEBOOK**LEVELS, size=NUM_ITEMS, replace=False)
    codes = np.stack([flat // CODEBOOK**2, flat // CODEBOOK % CODEBOOK, flat % CODEBOOK], axis=1)
    sizes = [CODEBOOK] * LEVELS
    tokenizer = build_scratch_tokenizer(items["title"].tolist(), 300, sizes, list(tasks))
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, dropout=0.0)
    model = build_scratch_model(cfg, tokenizer, seed=0).eval()
    vocab = SIDVocab.from_tokenizer(tokenizer, sizes)
    fmt = PromptFormat.markers(tokenizer, list(tasks))
    GenerativeRecommender(model, tokenizer, vocab, SIDTrie(codes, sizes), codes, fmt, max_history=5).save(
        run_dir / "sft" / "model"
    )
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def service(run_dir):
    return load_service(run_dir, num_beams=8)


def client(service, **cfg) -> TestClient:
    return TestClient(create_app(service, ServeConfig(num_beams=8, max_k=20, max_history_items=50, **cfg)))


class Gate:
    """Wraps the recommender to count its calls; after ``shut()``, a decode blocks until ``release`` is set."""

    def __init__(self, service):
        self.service, self.original = service, service.recommender.recommend
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.calls: list[int] = []

    def shut(self):
        self.entered.clear()
        self.release.clear()

    def recommend(self, histories, **kw):
        self.calls.append(len(histories))
        self.entered.set()
        assert self.release.wait(30), "the gate was never opened"
        return self.original(histories, **kw)

    def __enter__(self):
        self.service.recommender.recommend = self.recommend
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.service.recommender.recommend = self.original


# --------------------------------------------------------------------------- config


def test_a_public_bind_requires_an_api_key(monkeypatch):
    monkeypatch.delenv("GENREC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GENREC_API_KEY"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="API key is required"):
        load_serve_config(["host=192.168.1.5"])
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    assert ServeConfig(host="0.0.0.0", allow_unauthenticated=True).api_key == ""
    for host in ("127.0.0.1", "localhost", "::1"):
        assert ServeConfig(host=host).api_key == ""
    monkeypatch.setenv("GENREC_API_KEY", "from-env")
    assert load_serve_config(["host=0.0.0.0"]).api_key == "from-env"
    with pytest.raises(ConfigError, match="serve.max_qeue"):
        load_serve_config(["max_qeue=3"])
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        load_serve_config(["max_batch_size=0"])


# --------------------------------------------------------------------------- the batcher alone


def test_batcher_survives_a_failing_batch_and_finishes_accepted_work_on_close():
    calls = []

    def fn(payloads):
        calls.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("boom")
        return [p * 2 for p in payloads]

    async def scenario():
        batcher = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.2, arrival_gap_s=0.05, max_queue=8)
        await batcher.start()
        first = await asyncio.gather(*(batcher.submit(x) for x in (1, 2, 3)))
        failed = await asyncio.gather(batcher.submit("boom"), batcher.submit(5), return_exceptions=True)
        later = [asyncio.ensure_future(batcher.submit(x)) for x in (6, 7)]
        await asyncio.sleep(0)  # both are queued before close() is called
        await batcher.close(timeout=5)
        with pytest.raises(ShuttingDown):
            await batcher.submit(8)
        return first, failed, await asyncio.gather(*later), batcher

    first, failed, later, batcher = asyncio.run(scenario())
    assert first == [2, 4, 6] and calls[0] == [1, 2, 3]  # one batch
    assert [type(r) for r in failed] == [RuntimeError, RuntimeError]  # the failing batch only
    assert later == [12, 14] and (batcher.completed, batcher.failed, batcher.batches) == (5, 2, 3)


# --------------------------------------------------------------------------- requests


def test_recommend_by_id_and_title_excludes_seen_items(service):
    with client(service) as c:
        res = c.post("/recommend", json={"history": [3, "ITEM 5 title", 7], "k": 5})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["history"] == [3, 5, 7] and body["model"] == "sft" and body["mode"] == "direct"
        ids = [it["item_id"] for it in body["items"]]
        assert len(ids) == 5 and len(set(ids)) == 5 and not {3, 5, 7} & set(ids)
        scores = [it["score"] for it in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert body["items"][0]["sid"] == service.catalogue.sids[ids[0]]
        assert body["items"][0]["title"] == f"item {ids[0]} title"

        # The same ranking straight from the model: the service only drops the seen items.
        out = service.recommender.recommend([[3, 5, 7]], num_beams=8, k=8)
        direct = [i for i in out.items[0].tolist() if i not in (3, 5, 7)][:5]
        assert ids == direct

        res = c.post("/recommend", json={"history": [3, 5, 7], "k": 8, "exclude_seen": False})
        assert [it["item_id"] for it in res.json()["items"]] == out.items[0].tolist()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"history": []}, 422, "history: List should have at least 1 item"),
        ({"history": [1], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"history": [1], "k": 21}, 422, "k: Input should be less than or equal to 20"),
        ({"history": [1], "k": "5"}, 422, "k: Input should be a valid integer"),
        ({"history": [1, 99]}, 422, "history[1].item_id: Input should be less than or equal to 29 (got 99)"),
        ({"history": [1.5]}, 422, "history[0]: a history entry must be an item id (integer) or an exact title"),
        ({"history": [""]}, 422, "history[0].title: String should have at least 1 character"),
        ({"history": ["no such title"]}, 422, "history[0]: no item has the title 'no such title'"),
        ({"history": ["item 28 title"]}, 422, "names several items [28, 29]; send an item_id"),
        ({"history": [1], "mode": "reasoning"}, 422, "mode: Input should be 'direct'"),
        ({"history": [1], "model_dir": "/etc"}, 422, "model_dir: Extra inputs are not permitted"),
        ({"history": list(range(51))}, 422, "history: List should have at most 50 items"),
        ({"k": 3}, 422, "history: Field required"),
    ],
)
def test_invalid_requests_get_4xx_saying_what_is_wrong(service, body, status, says):
    with client(service) as c:
        res = c.post("/recommend", json=body)
    assert res.status_code == status
    assert says in res.json()["detail"], res.json()["detail"]


def test_reasoning_mode_when_the_model_was_trained_for_it(tmp_path):
    from genrec.methods.gream.reasoning import reasoning_recommend
    from genrec.methods.gream.tasks import REASON_TASK

    reasoning = load_service(build_run(tmp_path / "run", [REASON_TASK]), num_beams=8, max_think_tokens=3)
    assert reasoning.modes == ["direct", "reasoning"]
    with client(reasoning) as c:
        res = c.post("/recommend", json={"history": [3, 7], "k": 4, "mode": "reasoning"})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["mode"] == "reasoning" and body["rationale"].startswith("<think>")
        assert body["rationale"].endswith("[forced]")  # an untrained model never closes its rationale in 3 tokens
        ids = [it["item_id"] for it in body["items"]]
        out, _ = reasoning_recommend(reasoning.recommender, [[3, 7]], k=8, max_think_tokens=3, num_beams=8)
        assert ids == [i for i in out.items[0].tolist() if i not in (3, 7)][:4]
        assert c.post("/recommend", json={"history": [3, 7], "k": 4}).json()["rationale"] is None


class PopularRetriever:
    """A stand-in TRM: a fixed score per item, seen and excluded items never returned."""

    def __init__(self, num_items):
        self.num_items = num_items
        self.scores = torch.linspace(1.0, 0.0, num_items)

    def retrieve(self, histories, preferences, n, exclude=None):
        ids = []
        for b in range(len(histories)):
            banned = set(np.asarray(exclude[b]).tolist()) if exclude is not None else set()
            ids.append(([i for i in range(len(self.scores)) if i not in banned] + [-1] * n)[:n])
        ids = np.asarray(ids, dtype=np.int64)
        return ids, np.where(ids >= 0, self.scores[ids.clip(0)].numpy(), -np.inf)

    def score(self, histories, preferences=None):
        return self.scores.repeat(len(histories), 1)


def test_agent_mode_returns_items_and_the_transcript(tmp_path):
    from genrec.agent.config import AgentConfig
    from genrec.agent.protocol import AGENT_TASK
    from genrec.serve.service import RecommendService

    plain = load_service(build_run(tmp_path / "run", [AGENT_TASK]), num_beams=8)
    assert "agent" not in plain.modes  # no TRM in the run: the mode is not offered
    agent = RecommendService(
        plain.recommender,
        plain.catalogue,
        "agent_sft",
        num_beams=8,
        retriever=PopularRetriever(NUM_ITEMS),
        agent_cfg=AgentConfig(max_turns=2, retrieve_n=3, turn_tokens=4),
    )
    assert agent.modes == ["direct", "agent"]
    with client(agent) as c:
        res = c.post("/recommend", json={"history": [0, 1], "k": 5, "mode": "agent"})
        assert res.status_code == 200, res.text
        body = res.json()
        ids = [it["item_id"] for it in body["items"]]
        assert len(ids) == 5 and len(set(ids)) == 5 and not {0, 1} & set(ids)
        # An untrained model never closes a call in 4 tokens: every turn is malformed and says why.
        turns = body["transcript"]["turns"]
        assert turns and all(t["kind"] == "malformed" and t["error"] for t in turns)
        assert body["transcript"]["closed"] is False and body["rationale"] is None


def test_malformed_json_is_a_422(service):
    with client(service) as c:
        res = c.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 422 and "JSON decode error" in res.json()["detail"]


def test_request_bodies_are_size_limited(service):
    big = {"history": [1] * 40, "k": 3, "exclude_seen": True, "mode": "direct" + " " * 2000}
    with client(service, max_body_bytes=1024) as c:
        res = c.post("/recommend", json=big)
        assert res.status_code == 413 and "the limit is 1024 (serve.max_body_bytes)" in res.json()["detail"]

        def chunks():  # no Content-Length: the body arrives chunked and is counted as it comes
            yield b'{"history": [1], "mode": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        res = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert res.status_code == 413
        assert c.post("/recommend", json={"history": [1], "k": 2}).status_code == 200


def test_api_key_is_required_when_configured(service):
    with client(service, api_key=KEY) as c:
        for headers in ({}, {"X-API-Key": "wrong"}):
            res = c.post("/recommend", json={"history": [1]}, headers=headers)
            assert res.status_code == 401 and "X-API-Key" in res.json()["detail"]
            assert c.get("/items/1", headers=headers).status_code == 401
        assert c.post("/recommend", json={"history": [1]}, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert "APIKeyHeader" in c.get("/openapi.json").json()["components"]["securitySchemes"]


def test_item_lookup(service):
    with client(service) as c:
        item = c.get("/items/4").json()
        assert item["title"] == "item 4 title" and item["sid"] == service.catalogue.sids[4]
        assert item["attributes"] == {"brand": "brand0", "categories": "Cat, Sub1"}
        res = c.get("/items/30")
        assert res.status_code == 404 and "item_id 30 does not exist" in res.json()["detail"]
        assert [it["item_id"] for it in c.get("/items", params={"q": "ITEM 1", "limit": 3}).json()] == [1, 10, 11]
        assert c.get("/items", params={"q": ""}).status_code == 422
        res = c.get("/items", params={"q": "item", "path": "/etc/passwd"})
        assert res.status_code == 422 and "path: Extra inputs are not permitted" in res.json()["detail"]


def test_health_and_readiness(service):
    app = create_app(service, ServeConfig())
    with TestClient(app) as c:
        ready = c.get("/ready").json()
        assert ready["status"] == "ready" and ready["modes"] == ["direct"] and ready["num_items"] == NUM_ITEMS
    with TestClient(app) as c:  # a second lifespan (a restarted server) serves again
        assert c.get("/ready").status_code == 200
        assert c.post("/recommend", json={"history": [1], "k": 2}).status_code == 200
    c = TestClient(app)  # no lifespan: never warmed up, so not ready and no decoding
    assert c.get("/ready").status_code == 503
    res = c.post("/recommend", json={"history": [1]})
    assert res.status_code == 503 and res.headers["Retry-After"] == "5" and "starting up" in res.json()["detail"]


# --------------------------------------------------------------------------- batching and load


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(http.post("/recommend", json=b) for b in bodies))


def test_concurrent_requests_are_decoded_in_one_batch(service):
    bodies = [{"history": [i % NUM_ITEMS, (3 * i + 1) % NUM_ITEMS], "k": 4} for i in range(16)]
    cfg = ServeConfig(num_beams=8, max_batch_size=32, max_wait_ms=300, arrival_gap_ms=100)
    app = create_app(service, cfg)
    with Gate(service) as gate, ServerThread(app, cfg) as url:
        gate.calls.clear()  # the warm-up decode
        responses = asyncio.run(_post_all(url, bodies))
        batcher = app.state.batcher
    assert [r.status_code for r in responses] == [200] * 16
    # The first request may find the service idle and go alone; the rest arrive while it decodes
    # (or within the 100 ms gap), so one more beam search (at most two) serves them.
    assert len(gate.calls) <= 3 and sum(gate.calls) == 16, gate.calls
    assert batcher.largest_batch >= 8
    for body, res in zip(bodies, responses):
        alone = service.decode([Query(tuple(body["history"]), 4, True)])[0].items
        got = [(it["item_id"], it["score"]) for it in res.json()["items"]]
        assert [i for i, _ in got] == [i for i, _ in alone]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in alone], atol=1e-4)


def test_a_full_queue_answers_503_with_retry_after(service):
    cfg = ServeConfig(num_beams=8, max_batch_size=1, max_queue=2, max_wait_ms=0)
    app = create_app(service, cfg)

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            first = asyncio.ensure_future(http.post("/recommend", json={"history": [1]}))
            await asyncio.to_thread(gate.entered.wait, 30)  # the first request holds the model
            queued = [asyncio.ensure_future(http.post("/recommend", json={"history": [i]})) for i in (2, 3)]
            while app.state.batcher.depth < 2:
                await asyncio.sleep(0.01)
            rejected = await asyncio.gather(*(http.post("/recommend", json={"history": [i]}) for i in (4, 5, 6)))
            ready = await http.get("/ready")
            gate.release.set()
            return [await first, *await asyncio.gather(*queued)], rejected, ready

    with Gate(service) as gate, ServerThread(app, cfg) as url:
        gate.shut()
        accepted, rejected, ready = asyncio.run(scenario(url))
    assert [r.status_code for r in accepted] == [200] * 3
    for res in rejected:
        assert res.status_code == 503
        assert int(res.headers["Retry-After"]) >= 1
        assert "queue is full (2 requests waiting)" in res.json()["detail"]
    assert ready.status_code == 200 and ready.json()["batching"]["rejected"] == 3


def test_graceful_shutdown_finishes_requests_in_flight(service):
    cfg = ServeConfig(num_beams=8, max_batch_size=1, max_wait_ms=0)
    app = create_app(service, cfg)
    server = ServerThread(app, cfg)

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            flight = [asyncio.ensure_future(http.post("/recommend", json={"history": [i]})) for i in (1, 2, 3)]
            await asyncio.to_thread(gate.entered.wait, 30)
            while app.state.batcher.depth < 2:
                await asyncio.sleep(0.01)
            stopper = threading.Thread(target=server.stop)  # what SIGTERM does: should_exit, then drain
            stopper.start()
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                    await fresh.get("/health")
            gate.release.set()
            responses = await asyncio.gather(*flight)
            await asyncio.to_thread(stopper.join, 30)
            return responses

    with Gate(service) as gate:
        url = server.start()
        gate.shut()
        responses = asyncio.run(scenario(url))
    assert [r.status_code for r in responses] == [200] * 3
    assert all(len(r.json()["items"]) == 10 for r in responses)
    assert not server.thread.is_alive()
    assert app.state.batcher.completed == 3 and app.state.batcher.stats()["queue_depth"] == 0


# --------------------------------------------------------------------------- fuzzing


def test_openapi_fuzz(service):
    """Schemathesis requests from the service's own OpenAPI spec, valid and invalid: never a 5xx, always a
    documented status, headers and body."""
    import schemathesis
    from hypothesis import given

    checks = {
        # A schema-valid title may still name no item: a 422 that no schema can foresee.
        "positive_data_acceptance": {"enabled": False},
        # An invalid body may also be rejected for its size (413) before it is validated.
        "negative_data_rejection": {"expected-statuses": [400, 401, 413, 422]},
    }
    # The key goes through schemathesis' auth config, so that it also sends requests without it.
    auth = {"openapi": {"APIKeyHeader": {"api_key": KEY}}}
    statuses = collections.Counter()

    def call(case):
        statuses[case.method, case.path, case.call_and_validate().status_code] += 1

    cfg = ServeConfig(num_beams=8, max_k=20, max_history_items=50, api_key=KEY)
    with ServerThread(create_app(service, cfg), cfg) as url:
        config = schemathesis.Config.from_dict({"checks": checks, "auth": auth})
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
        fuzz = settings(
            max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            given(case=schema.as_strategy(generation_mode=mode))(fuzz(lambda case: call(case)))()
        # Generated titles name no item, so the successful recommendations come from explicit cases.
        recommend = schema["/recommend"]["POST"]
        for body in ({"history": [1, 2, "item 5 title"], "k": 3}, {"history": [0], "exclude_seen": False, "k": 20}):
            call(recommend.Case(body=body, headers={"X-API-Key": KEY}))  # auth applies to generated cases only
    assert statuses["POST", "/recommend", 200] >= 2 and statuses["POST", "/recommend", 422] > 0, statuses
    assert statuses["POST", "/recommend", 401] > 0  # requests without the key were tried, and refused
