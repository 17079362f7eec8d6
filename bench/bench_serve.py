"""Load benchmark of ``genrec serve``: requests/s and latency, micro-batched against one-at-a-time decoding.

The service runs in a subprocess on 127.0.0.1 (never another address); this process sends
the same requests (real test-split histories of the run, ``k`` items, seen items excluded)
from ``C`` concurrent clients, each sending its next request when the previous one is
answered, for C in ``--concurrency``. Each level is bounded by ``--requests`` and
``--max-seconds``. Two servers are measured: micro-batched (``max_batch_size`` 32) and
one at a time (``max_batch_size`` 1: every request is its own beam search), then an
overload run (many more clients than a small queue admits) to show the 503 path.

Every answer is checked: 200 with exactly the items a one-at-a-time decode of the same
request gives (computed in this process before the load starts), or 503 with Retry-After;
anything else (a 500, a dropped connection, a timeout) counts as lost. The clients are a
minimal HTTP/1.1 loop (``Connection``), so that on a small machine the load generator does
not take the CPU the server is being measured with. Use ``--threads 1`` on a 2-core machine:
more OpenMP threads than free cores makes both servers crawl.

    nice -n 10 python bench/bench_serve.py runs/beauty               # a run with a trained sft/ or rl/ model
    nice -n 10 python bench/bench_serve.py runs/beauty --random-model  # untrained weights of the default size

``--random-model`` builds an untrained scratch recommender of the default ``model`` config
size over the run's catalogue (with ``sid/codes.npy`` when the run has it, else random
unique 3 x 256 codes) in a temporary directory: timing does not depend on the weights'
values, and the run directory is not touched. Writes ``bench/results/serve.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve.md"


def build_random_model(run_dir: Path, out: Path, seed: int) -> None:
    """An untrained default-size recommender over ``run_dir``'s items, saved as ``out/sft/model``."""
    import pandas as pd

    from genrec.config import ModelConfig
    from genrec.model.backbone import build_scratch_model
    from genrec.model.prompt import PromptFormat
    from genrec.model.recommender import GenerativeRecommender
    from genrec.model.tokenizer import build_scratch_tokenizer
    from genrec.model.vocab import SIDVocab
    from genrec.sid.trie import SIDTrie

    items = pd.read_parquet(run_dir / "prepare" / "items.parquet")
    (out / "prepare").mkdir(parents=True)
    items.to_parquet(out / "prepare" / "items.parquet", index=False)
    if (run_dir / "sid" / "codes.npy").is_file():
        codes = np.load(run_dir / "sid" / "codes.npy")
    else:
        flat = np.random.default_rng(seed).choice(256**3, size=len(items), replace=False)
        codes = np.stack([flat // 256**2, flat // 256 % 256, flat % 256], axis=1)  # (N, 3)
    sizes = (codes.max(axis=0) + 1).tolist()
    cfg = ModelConfig()
    tokenizer = build_scratch_tokenizer(items["title"].fillna("").tolist(), cfg.text_vocab_size, sizes, [])
    model = build_scratch_model(cfg, tokenizer, seed).eval()
    vocab = SIDVocab.from_tokenizer(tokenizer, sizes)
    rec = GenerativeRecommender(
        model, tokenizer, vocab, SIDTrie(codes, sizes), codes, PromptFormat.markers(tokenizer, []), max_history=20
    )
    rec.save(out / "sft" / "model")


def serve_only(args) -> None:
    """The server subprocess: the run's model behind genrec's service, on loopback."""
    import torch

    from genrec.serve.app import serve
    from genrec.serve.config import ServeConfig

    torch.set_num_threads(args.threads)
    cfg = ServeConfig(
        host="127.0.0.1",
        port=args.port,
        num_beams=args.num_beams,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
    )
    serve(args.run_dir, cfg)


def http_stack() -> str:
    """What uvicorn's "auto" picks: httptools and uvloop when installed, else h11 and asyncio."""
    import importlib.util

    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{parser} + {loop}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bench_serve.py --serve-only`` in a subprocess; waits for /ready."""

    def __init__(self, run_dir: Path, args, max_batch_size: int, max_queue: int, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, __file__, str(run_dir), "--serve-only", "--port", str(self.port),
               "--threads", str(args.threads), "--num-beams", str(args.num_beams),
               "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue)]  # fmt: skip
        self.log = log_dir / f"server-{self.port}.log"
        with open(self.log, "w") as f:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise SystemExit("the server did not become ready in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: the graceful shutdown path
        self.proc.wait(60)

    def counters(self) -> tuple[int, int]:
        """(batches, requests decoded) so far, from /ready."""
        import httpx

        stats = httpx.get(f"{self.url}/ready", timeout=10).json()["batching"]
        return stats["batches"], stats["completed"] + stats["failed"]

    def measure(self, bodies, expected, concurrency: int, max_seconds: float) -> tuple[list, float, int, int]:
        """One round of a load level: its results, wall time, and the batches and requests the server decoded."""
        batches, decoded = self.counters()
        results, wall = asyncio.run(load(self.port, bodies, expected, concurrency, max_seconds))
        batches_after, decoded_after = self.counters()
        return results, wall, batches_after - batches, decoded_after - decoded


def level_row(concurrency: int, measured: list[tuple[list, float, int, int]]) -> dict:
    """The table row of a level from its rounds (``Server.measure`` results)."""
    mean_batch = sum(m[3] for m in measured) / max(sum(m[2] for m in measured), 1)
    return summarize(concurrency, [(m[0], m[1]) for m in measured], mean_batch)


class Connection:
    """A minimal HTTP/1.1 keep-alive client (POST with JSON, Content-Length framing).

    httpx's async client, measured here, tops out near 300 requests/s on this machine even for
    a trivial GET, where this loop does over 3,000: with httpx the benchmark would measure its
    own client. uvicorn always frames responses with Content-Length, which is all this reads.
    """

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def post(self, path: str, body: dict, timeout: float) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines if ":" in h)}
        payload = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), timeout)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), headers, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(port: int, bodies: list[dict], expected: list[list[int]], concurrency: int, max_seconds: float):
    """``concurrency`` closed-loop clients over ``bodies``: ([(kind, seconds, reason)], wall seconds)."""
    next_index, results = 0, []
    started = time.perf_counter()

    async def client() -> None:
        nonlocal next_index
        conn = Connection(port)
        while next_index < len(bodies) and time.perf_counter() - started < max_seconds:
            i = next_index
            next_index += 1
            sent = time.perf_counter()
            try:
                status, headers, payload = await conn.post("/recommend", bodies[i], timeout=120)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, KeyError, ValueError) as exc:
                results.append(("lost", time.perf_counter() - sent, type(exc).__name__))
                await conn.close()
                continue
            seconds = time.perf_counter() - sent
            if status == 200:
                got = [it["item_id"] for it in json.loads(payload)["items"]]
                results.append(("ok" if got == expected[i] else "wrong", seconds, ""))
            elif status == 503 and int(headers.get("retry-after", "0")) >= 1:
                results.append(("503", seconds, ""))
            else:
                results.append(("lost", seconds, f"HTTP {status}"))
        await conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def summarize(concurrency: int, rounds: list[tuple[list, float]], mean_batch: float) -> dict:
    """One table row from the rounds of a level: counts summed, latencies pooled, rate the median round."""
    results = [r for round_results, _ in rounds for r in round_results]
    kinds = [r[0] for r in results]
    answered_ms = np.array([1000 * s for kind, s, _ in results if kind in ("ok", "wrong")])
    rates = [sum(r[0] in ("ok", "wrong") for r in rr) / wall for rr, wall in rounds]
    return {
        "concurrency": concurrency,
        "sent": len(results),
        "ok": kinds.count("ok"),
        "wrong": kinds.count("wrong"),
        "503": kinds.count("503"),
        "lost": kinds.count("lost"),
        "lost_reasons": sorted({r[2] for r in results if r[0] == "lost"}),
        "answered_per_s": float(np.median(rates)),
        "rates": rates,
        "p50_ms": float(np.percentile(answered_ms, 50)) if len(answered_ms) else float("nan"),
        "p99_ms": float(np.percentile(answered_ms, 99)) if len(answered_ms) else float("nan"),
        "mean_batch": mean_batch,
    }


def make_requests(run_dir: Path, num: int, k: int, seed: int) -> list[dict]:
    """``num`` distinct users' test histories (their last 20 items), in a random order."""
    from genrec.data.dataset import Dataset

    examples = Dataset.load(run_dir / "prepare", max_history=20).examples("test")
    users = np.random.default_rng(seed).permutation(len(examples))[:num]
    return [{"history": examples.histories[u].tolist(), "k": k, "exclude_seen": True} for u in users]


def reference_answers(run_dir: Path, bodies: list[dict], num_beams: int) -> tuple[list[list[int]], str]:
    """What each request must get: its items decoded alone, as one-at-a-time serving would."""
    from genrec.serve.service import Query, load_service

    service = load_service(run_dir, num_beams=num_beams)
    answers = [[i for i, _ in service.decode([Query(tuple(b["history"]), b["k"], True)])[0].items] for b in bodies]
    return answers, service.model_name


def table(rows: list[dict]) -> str:
    lines = [
        "| server | clients | sent | correct 200 | wrong 200 | 503 | lost | answered/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['sent']} | {r['ok']} | {r['wrong']} | {r['503']} | "
            f"{r['lost']}{' ' + ','.join(r['lost_reasons']) if r['lost'] else ''} | {r['answered_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory with prepare/ (and a trained model, or --random-model)")
    p.add_argument("--random-model", action="store_true", help="an untrained default-size model over the run's items")
    p.add_argument("--requests", type=int, default=256, help="requests per load level and round, at most")
    p.add_argument("--max-seconds", type=float, default=60, help="time per load level and round, at most")
    p.add_argument("--rounds", type=int, default=3, help="rounds per level, the two servers taking turns")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--overload", type=int, default=128, help="clients of the overload run (0 skips it)")
    p.add_argument("--overload-queue", type=int, default=16, help="max_queue of the overload run")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-batch-size", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--max-queue", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_only:
        return serve_only(args)

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="genrec-bench-serve-") as tmp:
        run_dir = args.run_dir
        if args.random_model:
            print("building an untrained default-size model over the run's items ...", flush=True)
            build_random_model(args.run_dir, Path(tmp), args.seed)
            run_dir = Path(tmp)
        bodies = make_requests(args.run_dir, args.requests, args.k, args.seed)
        print(f"decoding {len(bodies)} requests one at a time for the reference answers ...", flush=True)
        started = time.perf_counter()
        expected, model_name = reference_answers(run_dir, bodies, args.num_beams)
        print(f"  {time.perf_counter() - started:.1f}s", flush=True)

        rows = []
        log = Path(tmp)
        # Both servers stay up (the idle one costs nothing) and take turns at each level, so a
        # change in the machine's load hits both alike.
        with Server(run_dir, args, 32, 256, log) as batched, Server(run_dir, args, 1, 256, log) as single:
            servers = {"micro-batched (32)": batched, "one at a time": single}
            for c in args.concurrency:
                rounds = {name: [] for name in servers}
                for _ in range(args.rounds):
                    for name, server in servers.items():
                        rounds[name].append(server.measure(bodies, expected, c, args.max_seconds))
                for name, measured in rounds.items():
                    rows.append({"server": name, **level_row(c, measured)})
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.overload:
            with Server(run_dir, args, 32, args.overload_queue, log) as server:
                # Rejected requests return at once, so the overload run sends more.
                row = level_row(
                    args.overload, [server.measure(bodies * 4, expected * 4, args.overload, args.max_seconds)]
                )
                rows.append({"server": f"micro-batched, max_queue {args.overload_queue}", **row})
                print(table(rows[-1:]).splitlines()[-1], flush=True)

    by = {(r["server"], r["concurrency"]): r["answered_per_s"] for r in rows}
    top = max(args.concurrency)
    speedup = by[("micro-batched (32)", top)] / by[("one at a time", top)]
    rates = {(r["server"], r["concurrency"]): r["rates"] for r in rows}
    per_round = ", ".join(
        f"{b / s:.2f}x" for b, s in zip(rates[("micro-batched (32)", top)], rates[("one at a time", top)])
    )
    weights = "untrained weights, default scratch size" if args.random_model else f"the run's {model_name} model"
    header = (
        f"# Serving benchmark\n\n{args.run_dir.name}: {len(bodies)} test histories (last 20 items), k={args.k}, "
        f"exclude_seen, num_beams {args.num_beams}; {weights}; server: torch {torch.__version__} with "
        f"{args.threads} thread(s), uvicorn with {http_stack()}; {os.cpu_count()} CPUs ({platform.machine()}), "
        f"load average {load_before:.1f} at the start; client and server on the same machine (loopback).\n"
    )
    text = (
        f"{header}\n{table(rows)}\n\nMicro-batching at {top} clients: {speedup:.2f}x the requests/s of "
        f"one-at-a-time decoding (per round: {per_round}). {args.rounds} rounds per level, the two servers "
        "taking turns; 'answered/s' is the median round, latencies are pooled over the rounds. 'correct 200': "
        "the same items as the request decoded alone; 'lost': a 5xx, a dropped connection or a timeout; "
        "'mean batch': requests per beam-search batch the server formed.\n\n"
        f"Command: `python bench/bench_serve.py {shlex.join(sys.argv[1:])}` (under `nice -n 10`)\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    lost = sum(r["lost"] + r["wrong"] for r in rows)
    if lost:
        raise SystemExit(f"{lost} requests were lost or answered wrongly")


if __name__ == "__main__":
    main()
