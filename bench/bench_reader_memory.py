"""Readers stream: peak memory and speed of reading a 1,000,000-line Amazon 2014 review file.

    nice -n 10 python bench/bench_reader_memory.py [--lines 1000000] [--meta-lines 100000]

Writes ``reviews_X_5.json.gz`` (JSON lines with review text, as upstream) and
``meta_X.json.gz`` (Python-literal lines) into a temporary directory, then reads each stream
through ``open_source(...)`` in a fresh child process that reports its peak RSS
(``resource.getrusage``) before and after the pass. Prints a Markdown table and writes it
into docs/data.md between the ``bench_reader_memory`` markers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "data.md"
BEGIN, END = "<!-- bench_reader_memory -->", "<!-- /bench_reader_memory -->"
WORDS = ("great works well color skin smell price cheap broke love hate hair nails product "
         "would buy again bottle small large quality shipping fast dry oily").split()  # fmt: skip


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(directory: Path, lines: int, meta_lines: int, seed: int = 0) -> dict:
    """Write the two files; returns their compressed and uncompressed sizes in bytes."""
    rng = random.Random(seed)
    sizes = {}
    reviews = directory / "reviews_X_5.json.gz"
    raw = 0
    with gzip.open(reviews, "wt", encoding="utf-8", compresslevel=1) as f:
        for n in range(lines):
            text = " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))
            line = json.dumps({
                "reviewerID": f"A{rng.randrange(lines // 10):013d}", "asin": f"B{rng.randrange(meta_lines):09d}",
                "reviewerName": "Reviewer", "helpful": [0, 0], "reviewText": text, "overall": float(rng.randint(1, 5)),
                "summary": text[:30], "unixReviewTime": 1_300_000_000 + n, "reviewTime": "01 30, 2014",
            }) + "\n"  # fmt: skip
            raw += len(line.encode())
            f.write(line)
    sizes["reviews"] = (reviews.stat().st_size, raw)
    meta = directory / "meta_X.json.gz"
    raw = 0
    with gzip.open(meta, "wt", encoding="utf-8", compresslevel=1) as f:
        for n in range(meta_lines):
            record = {
                "asin": f"B{n:09d}", "title": f"Women's item {n} &amp; more", "price": 9.99,
                "imUrl": f"http://ecx.images-amazon.com/images/I/{n}.jpg", "salesRank": {"Beauty": n},
                "categories": [["Beauty", "Makeup", "Face"]], "description": " ".join(rng.choices(WORDS, k=50)),
            }  # fmt: skip
            line = repr(record) + "\n"  # Python literal, single quotes, as the 2014 meta files
            raw += len(line.encode())
            f.write(line)
    sizes["meta"] = (meta.stat().st_size, raw)
    return sizes


def read(directory: Path, stream: str) -> None:
    """Child process: one pass over a stream, counting; prints JSON with time and peak RSS."""
    from genrec.config import DataConfig
    from genrec.data.readers import open_source

    source = open_source(DataConfig(format="amazon2014", path=str(directory), name="X"))
    before = peak_rss_mb()
    started = time.perf_counter()
    count = sum(1 for _ in (source.interactions() if stream == "interactions" else source.items()))
    seconds = time.perf_counter() - started
    print(json.dumps({"count": count, "seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak_rss_mb()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--meta-lines", type=int, default=100_000)
    ap.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stream", default="interactions", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        read(args.read, args.stream)
        return 0

    with tempfile.TemporaryDirectory(prefix="genrec-bench-") as tmp:
        started = time.perf_counter()
        sizes = generate(Path(tmp), args.lines, args.meta_lines)
        print(f"generated in {time.perf_counter() - started:.0f} s: {sizes}", file=sys.stderr)
        results = {}
        for stream in ("interactions", "items"):
            out = subprocess.run(
                [sys.executable, __file__, "--read", tmp, "--stream", stream],
                capture_output=True,
                text=True,
                check=True,
            )
            results[stream] = json.loads(out.stdout)

    rows = []
    for stream, key, file in (("interactions", "reviews", "reviews_X_5.json.gz"), ("items", "meta", "meta_X.json.gz")):
        r, (packed, raw) = results[stream], sizes[key]
        rows.append(
            f"| `{file}` | {r['count']:,} | {packed / 2**20:,.1f} MiB ({raw / 2**20:,.1f} MiB unpacked) "
            f"| {r['count'] / r['seconds']:,.0f} | {r['rss_before_mb']:.1f} MiB | {r['rss_peak_mb']:.1f} MiB |"
        )
    command = "nice -n 10 python bench/bench_reader_memory.py" + (
        f" --lines {args.lines} --meta-lines {args.meta_lines}" if (args.lines, args.meta_lines) != (1_000_000, 100_000)
        else ""
    )  # fmt: skip
    table = (
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores "
        f"shared with other jobs, Python {platform.python_version()}). Peak RSS of a fresh process after "
        "`open_source` and after one full pass over the stream:\n\n"
        "| file (amazon2014) | lines read | size | lines/s | RSS before | peak RSS after |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print(table)
    if DOC.exists() and BEGIN in DOC.read_text():
        from genrec.io import atomic_write_text

        text = DOC.read_text()
        atomic_write_text(DOC, re.sub(f"{BEGIN}.*?{END}", lambda _: f"{BEGIN}\n{table}{END}", text, flags=re.S))
        print(f"updated {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
