"""LLM backends, answer validation and the call cache, against a loopback OpenAI-compatible server.

``FakeOpenAI`` (also used by test_interests_mining.py) answers ``/v1/chat/completions``
as the real API does, JSON body, ``usage`` and HTTP errors included; each test decides the
reply per request.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from genrec.interests.backends import (
    BackendError,
    CallFailed,
    ChatResult,
    HFLocalBackend,
    OpenAIBackend,
    VisionBackend,
    backoff_seconds,
    image_content_part,
)
from genrec.interests.cache import CallCache, call_key
from genrec.interests.schema import Interest, MalformedAnswer, normalize, parse_caption, parse_interests

SECRET = "sk-test-0123456789-SECRET"


# --------------------------------------------------------------------------- the fake server


@dataclass
class Reply:
    status: int = 200
    # The assistant message's content (status 200), or the error message (other statuses).
    content: str | None = ""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int] = (11, 7)


def answer_json(phrases: list[str], confidence: float = 0.8) -> str:
    return json.dumps(
        {
            "reasoning": "The evidence points there.",
            "descriptors": [
                {"descriptor": p, "rationale": f"because of {p}", "confidence": confidence} for p in phrases
            ],
        }
    )


def first_user_text(body: dict) -> str:
    content = [m for m in body["messages"] if m["role"] == "user"][0]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def echo_title(body: dict, n: int) -> Reply:
    """A valid answer naming the prompt's first title, so that different prompts get different interests."""
    titles = re.findall(r"Title: ([^;\n]+)", first_user_text(body))
    return Reply(content=answer_json([f"fan of {titles[-1] if titles else 'things'}", "practical buyer"]))


class FakeOpenAI:
    """A threaded HTTP server on 127.0.0.1:<free port> speaking the chat completions API.

    ``reply(body, n)`` gets the request JSON and its 0-based arrival number. Every request
    is kept in ``requests`` with its Authorization header; ``ok`` counts 200 answers.
    """

    def __init__(self, reply: Callable[[dict, int], Reply] = echo_title):
        self.reply = reply
        self.requests: list[dict] = []
        self.ok_bodies: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
                r = server.reply(body, n)
                time.sleep(r.delay)
                if r.status != 200:
                    return self._send(
                        r.status, {"error": {"message": r.content or "error", "type": "server_error"}}, r.headers
                    )
                with server.lock:
                    server.ok_bodies.append(body)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{n}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": r.content},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": r.usage[0],
                            "completion_tokens": r.usage[1],
                            "total_tokens": sum(r.usage),
                        },
                    },
                    r.headers,
                )

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that timed out and left
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def ok(self) -> int:
        return len(self.ok_bodies)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def backend(server: FakeOpenAI, sleeps: list | None = None, **kw) -> OpenAIBackend:
    kw = {"api_key_env": "", "max_retries": 2, "timeout": 5.0, **kw}
    return OpenAIBackend(
        "fake", server.url, "fake-model", sleep=(sleeps.append if sleeps is not None else lambda s: None), **kw
    )


# --------------------------------------------------------------------------- OpenAI backend


def test_ok_answer_tokens_and_key_in_header(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", SECRET)
    with FakeOpenAI(lambda body, n: Reply(content="hello", usage=(31, 4))) as server:
        result = backend(server, api_key_env="FAKE_KEY").complete([{"role": "user", "content": "hi"}])
    assert result == ChatResult("hello", 31, 4)
    req = server.requests[0]
    assert req["auth"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "fake-model"
    assert req["body"]["temperature"] == 0.0 and req["body"]["max_tokens"] == 768


def test_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(BackendError, match="NOT_SET_KEY"):
        OpenAIBackend("x", "http://127.0.0.1:1/v1", "m", api_key_env="NOT_SET_KEY")


def test_http_500_then_ok_is_retried_with_backoff():
    sleeps: list[float] = []
    with FakeOpenAI(lambda body, n: Reply(500, "boom") if n < 2 else Reply(content="fine")) as server:
        result = backend(server, sleeps, backoff_base=0.5).complete([{"role": "user", "content": "q"}])
    assert result.text == "fine"
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_429_honours_retry_after():
    sleeps: list[float] = []
    reply = lambda body, n: Reply(429, "slow down", headers={"Retry-After": "3"}) if n == 0 else Reply(content="ok")  # noqa: E731
    with FakeOpenAI(reply) as server:
        assert backend(server, sleeps).complete([{"role": "user", "content": "q"}]).text == "ok"
    assert sleeps == [3.0]


def test_timeouts_exhaust_retries_then_fail():
    sleeps: list[float] = []
    with FakeOpenAI(lambda body, n: Reply(content="late", delay=1.0)) as server:
        with pytest.raises(CallFailed) as err:
            backend(server, sleeps, timeout=0.2, max_retries=1).complete([{"role": "user", "content": "q"}])
    assert err.value.reason == "timeout"
    assert len(server.requests) == 2 and sleeps == [1.0]


def test_bad_request_is_not_retried_and_auth_failure_stops():
    with FakeOpenAI(lambda body, n: Reply(400, "context too long")) as server:
        with pytest.raises(CallFailed) as err:
            backend(server, []).complete([{"role": "user", "content": "q"}])
    assert err.value.reason == "http_400" and len(server.requests) == 1
    with FakeOpenAI(lambda body, n: Reply(401, "bad key")) as server:
        with pytest.raises(BackendError, match="credentials refused"):
            backend(server, []).complete([{"role": "user", "content": "q"}])


def test_backoff_is_exponential_and_capped():
    assert [backoff_seconds(k, 1.0, 5.0) for k in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert backoff_seconds(0, 1.0, 5.0, retry_after=9.0) == 5.0


# --------------------------------------------------------------------------- answer validation


def test_parse_valid_fenced_and_reasoned_answers():
    text = answer_json(["Lip care", "gift shopping"], 0.7)
    want = [
        Interest("Lip care", "because of Lip care", 0.7),
        Interest("gift shopping", "because of gift shopping", 0.7),
    ]
    assert parse_interests(text, 5) == want
    assert parse_interests(f"```json\n{text}\n```", 5) == want
    assert parse_interests('Let me think. e.g. {"x": 1}. Final:\n' + text, 5) == want
    assert parse_interests(text, 1) == want[:1]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("I'm sorry, but I cannot help with that.", "refusal"),
        ("As an AI language model I can not do this", "refusal"),
        ('{"descriptors": [{"descriptor": "a", ', "invalid_json"),
        ("interests: lip care, hair", "invalid_json"),
        ('{"descriptors": []}', "schema"),
        ('{"interests": [{"descriptor": "a", "rationale": "r", "confidence": 0.5}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "rationale": "r", "confidence": 1.5}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "rationale": "r", "confidence": true}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "rationale": "r", "confidence": "0.5"}]}', "schema"),
        ('{"descriptors": [{"descriptor": "", "rationale": "r", "confidence": 0.5}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "rationale": " ", "confidence": 0.5}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "confidence": 0.5}]}', "schema"),
        ('{"descriptors": [{"descriptor": "a", "rationale": "r", "confidence": 0.5, "x": 1}]}', "schema"),
        (
            '{"descriptors": [{"descriptor": "Lip care", "rationale": "r", "confidence": 0.5},'
            ' {"descriptor": "lip-care!", "rationale": "r", "confidence": 0.4}]}',
            "schema",
        ),
    ],
)
def test_malformed_answers_are_classified(text, reason):
    with pytest.raises(MalformedAnswer) as err:
        parse_interests(text, 5)
    assert err.value.reason == reason


def test_normalize_and_caption():
    assert normalize("  Lip-Care, Products! ") == "lip care products"
    assert parse_caption(" A red\n bottle. ") == "A red bottle."
    with pytest.raises(MalformedAnswer, match="declined"):
        parse_caption("Sorry, I can't see images.")


# --------------------------------------------------------------------------- the cache


def test_cache_key_is_canonical_and_separates_backends_models_params():
    msgs = [{"role": "user", "content": "q"}]
    k = call_key("a", "m", msgs, {"temperature": 0.0, "max_tokens": 5})
    assert k == call_key("a", "m", [{"content": "q", "role": "user"}], {"max_tokens": 5, "temperature": 0.0})
    assert (
        len(
            {
                k,
                call_key("b", "m", msgs, {"temperature": 0.0, "max_tokens": 5}),
                call_key("a", "m2", msgs, {"temperature": 0.0, "max_tokens": 5}),
                call_key("a", "m", msgs, {"temperature": 0.5, "max_tokens": 5}),
            }
        )
        == 4
    )


def test_cache_persists_counts_and_keeps_no_key(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FAKE_KEY", SECRET)
    path = tmp_path / "calls.sqlite"
    with FakeOpenAI(lambda body, n: Reply(content="answer", usage=(20, 5))) as server:
        b = backend(server, [], api_key_env="FAKE_KEY")
        msgs = [{"role": "user", "content": "q"}]
        key = call_key(b.name, b.model, msgs, b.params)
        with CallCache(path) as cache:
            assert cache.fetch(key, b.name, b.model, lambda: b.complete(msgs)).text == "answer"
            assert cache.fetch(key, b.name, b.model, lambda: b.complete(msgs)).text == "answer"
            stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["prompt_tokens"], stats["saved_prompt_tokens"]) == (1, 1, 20, 20)
        with CallCache(path) as cache:  # a new session: answered from the file
            assert cache.fetch(key, b.name, b.model, lambda: pytest.fail("called twice")) == ChatResult("answer", 20, 5)
            assert cache.stats()["per_backend"]["fake"]["hits"] == 1
        assert server.ok == 1
    # Failing calls log and raise too: neither may carry the key.
    with FakeOpenAI(lambda body, n: Reply(500, "boom")) as server:
        with pytest.raises(CallFailed) as err:
            backend(server, [], api_key_env="FAKE_KEY", max_retries=1).complete(msgs)
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert SECRET.encode() not in blob and b"answer" in blob
    assert "retry 1" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(b) and SECRET not in str(err.value)


def test_concurrent_identical_questions_make_one_call(tmp_path):
    calls = []

    def slow_call():
        calls.append(1)
        time.sleep(0.2)
        return ChatResult("x", 1, 1)

    with CallCache(tmp_path / "c.sqlite") as cache:
        threads = [threading.Thread(target=cache.fetch, args=("k", "b", "m", slow_call)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = cache.stats()
    assert len(calls) == 1 and (stats["misses"], stats["hits"]) == (1, 3)


def test_failed_call_is_not_cached_and_is_recorded(tmp_path):
    from genrec.interests.miner import ask

    with FakeOpenAI(lambda body, n: Reply(503, "down") if n < 3 else Reply(content=answer_json(["a"]))) as server:
        b = backend(server, [], max_retries=2)
        msgs = [{"role": "user", "content": "q"}]
        with CallCache(tmp_path / "c.sqlite") as cache:
            with pytest.raises(CallFailed):
                ask(b, msgs, cache, lambda t: parse_interests(t, 5), malformed_retries=0)
            assert cache.stats()["failures"] == 1
            # The next session asks again (nothing was answered) and succeeds.
            assert ask(b, msgs, cache, lambda t: parse_interests(t, 5), 0)[0].interest == "a"
    assert server.ok == 1


# --------------------------------------------------------------------------- malformed answers are asked again


@pytest.mark.parametrize("bad", ["not json at all", "", "I'm sorry, I cannot do that."])
def test_malformed_answer_is_asked_again_with_the_problem(tmp_path, bad):
    from genrec.interests.miner import ask

    def reply(body, n):
        return Reply(content=bad if len(body["messages"]) == 1 else answer_json(["lip care"]))

    with FakeOpenAI(reply) as server, CallCache(tmp_path / "c.sqlite") as cache:
        got = ask(backend(server, []), [{"role": "user", "content": "q"}], cache, lambda t: parse_interests(t, 5), 2)
    assert [i.interest for i in got] == ["lip care"]
    second = server.requests[1]["body"]["messages"]
    assert second[1] == {"role": "assistant", "content": bad}
    assert "could not be used" in second[2]["content"]


def test_always_malformed_is_recorded_and_cached_for_the_rerun(tmp_path):
    from genrec.interests.miner import ask

    with FakeOpenAI(lambda body, n: Reply(content="no json")) as server:
        for _ in range(2):
            with CallCache(tmp_path / "c.sqlite") as cache:
                with pytest.raises(MalformedAnswer) as err:
                    ask(
                        backend(server, []),
                        [{"role": "user", "content": "q"}],
                        cache,
                        lambda t: parse_interests(t, 5),
                        2,
                    )
                stats = cache.stats()
            assert err.value.reason == "invalid_json" and stats["failures"] == 1
    # 3 asks (1 + 2 corrections) in the first session, none in the second.
    assert server.ok == 3 and (stats["hits"], stats["misses"]) == (3, 0)


# --------------------------------------------------------------------------- vision


def test_image_parts_and_vision_request(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    (tmp_path / "img.png").write_bytes(png)
    assert image_content_part("https://x.org/a.jpg") == {
        "type": "image_url",
        "image_url": {"url": "https://x.org/a.jpg"},
    }
    part = image_content_part("img.png", tmp_path)
    head, data = part["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(data) == png
    with pytest.raises(FileNotFoundError, match="missing.png"):
        image_content_part("missing.png", tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="image type"):
        image_content_part("notes.txt", tmp_path)
    with FakeOpenAI(lambda body, n: Reply(content="A red bottle.")) as server:
        vlm = VisionBackend("vlm", server.url, "vlm-model", api_key_env="", sleep=lambda s: None)
        msgs = [
            {"role": "user", "content": [{"type": "text", "text": "describe"}, vlm.image_part("img.png", tmp_path)]}
        ]
        assert vlm.complete(msgs).text == "A red bottle."
    sent = server.requests[0]["body"]["messages"][0]["content"]
    assert sent[1]["type"] == "image_url" and sent[1]["image_url"]["url"].startswith("data:image/png;base64,")


# --------------------------------------------------------------------------- local HF model


def tiny_chat_model(path) -> None:
    """A randomly initialised 1-layer Qwen2 with a tiny byte-level BPE tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ['{"descriptors": [{"descriptor": "lip care", "rationale": "r", "confidence": 0.5}]}'] * 5, trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)


@pytest.mark.slow  # importing transformers takes most of it
def test_hf_local_backend_garbage_goes_down_the_malformed_path(tmp_path):
    from genrec.interests.miner import ask

    tiny_chat_model(tmp_path / "tiny")
    hf = HFLocalBackend("tiny", tmp_path / "tiny", max_tokens=16)
    msgs = [{"role": "user", "content": "q lip care"}]
    result = hf.complete(msgs)
    assert result.prompt_tokens > 3 and 1 <= result.completion_tokens <= 16
    assert hf.complete(msgs) == result  # greedy: the same answer
    for session in range(2):
        with CallCache(tmp_path / "c.sqlite") as cache:
            with pytest.raises(MalformedAnswer):
                ask(hf, msgs, cache, lambda t: parse_interests(t, 5), malformed_retries=1)
            stats = cache.stats()
        assert stats["failures"] == 1
        assert (stats["misses"], stats["hits"]) == ((2, 0) if session == 0 else (0, 2))


def test_hf_local_backend_config_errors(tmp_path):
    with pytest.raises(BackendError, match="no config.json"):
        HFLocalBackend("x", tmp_path)
