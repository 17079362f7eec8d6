"""The ``sid`` stage: item embeddings -> unique Semantic IDs, the quantiser and a quality report.

``build_sids`` is the whole stage as a function (DeepInterestGR calls it with
interest-enhanced embeddings); ``assign_codes`` re-derives the codes from a fitted or
loaded quantiser, and gives the same codes as ``build_sids`` did.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from genrec.config import SIDConfig
from genrec.io import atomic_write_bytes, write_json
from genrec.sid.collisions import resolve_collisions
from genrec.sid.quality import format_quality, quality_report
from genrec.text.encode import check_embeddings, unit_rows

# File name of the saved quantiser per quantiser name.
QUANTIZER_FILES = {"rqvae": "quantizer.pt", "rkmeans": "quantizer.npz", "rkmeans_balanced": "quantizer.npz"}


def make_quantizer(cfg: SIDConfig, seed: int):
    """The unfitted quantiser named by ``sid.quantizer``."""
    from genrec.sid.kmeans import ResidualKMeans

    if cfg.quantizer == "rqvae":
        from genrec.sid.rqvae import RQVAE

        return RQVAE(
            cfg.levels,
            cfg.codebook_size,
            cfg.rqvae_hidden,
            cfg.rqvae_latent,
            cfg.rqvae_epochs,
            cfg.rqvae_lr,
            cfg.rqvae_beta,
            cfg.rqvae_batch_size,
            cfg.kmeans_iters,
            seed,
        )
    if cfg.quantizer in ("rkmeans", "rkmeans_balanced"):
        return ResidualKMeans(
            cfg.levels,
            cfg.codebook_size,
            cfg.kmeans_iters,
            seed,
            balanced=cfg.quantizer == "rkmeans_balanced",
            pca_dim=cfg.pca_dim,
            balanced_iters=cfg.balanced_iters,
        )
    raise ValueError(f"sid.quantizer: unknown {cfg.quantizer!r}; use rqvae, rkmeans or rkmeans_balanced")


def load_quantizer(path: str | Path):
    """A saved quantiser (``quantizer.pt`` for RQ-VAE, ``quantizer.npz`` for residual k-means)."""
    path = Path(path)
    if path.suffix == ".pt":
        from genrec.sid.rqvae import RQVAE

        return RQVAE.load(path)
    from genrec.sid.kmeans import ResidualKMeans

    return ResidualKMeans.load(path)


def check_inputs(emb: np.ndarray, cfg: SIDConfig) -> np.ndarray:
    """The embeddings as float32 (N, D), or a ValueError that says what to change."""
    emb = np.asarray(emb)
    check_embeddings(emb)
    n = len(emb)
    if n < cfg.codebook_size:
        raise ValueError(
            f"sid.codebook_size={cfg.codebook_size} needs at least {cfg.codebook_size} items, got {n}: "
            "lower sid.codebook_size"
        )
    if cfg.collision == "sinkhorn" and n > cfg.codebook_size**cfg.levels:
        raise ValueError(
            f"sid.collision=sinkhorn keeps {cfg.levels} levels of {cfg.codebook_size} codes, "
            f"{cfg.codebook_size**cfg.levels} SIDs for {n} items: raise sid.codebook_size or sid.levels, "
            "or use sid.collision=dedup"
        )
    return emb.astype(np.float32)


def assign_codes(quantizer, emb: np.ndarray, cfg: SIDConfig) -> tuple[np.ndarray, np.ndarray, list[int], dict]:
    """Encode and make unique: (codes (N, L'), codes before resolution (N, L), codebook sizes (L',), resolution info)."""
    emb = check_inputs(emb, cfg)
    before = quantizer.encode(emb)
    codes, sizes, info = resolve_collisions(quantizer, emb, before, cfg.collision)
    return codes, before, sizes, info


def build_sids(
    emb: np.ndarray, cfg: SIDConfig, seed: int, categories: list[str] | None = None
) -> tuple[np.ndarray, dict, object]:
    """Fit the quantiser on ``emb`` (N, D) and return (unique codes (N, L'), quality report, fitted quantiser)."""
    emb = check_inputs(emb, cfg)
    if categories is not None and len(categories) != len(emb):
        raise ValueError(f"got {len(categories)} category paths for {len(emb)} embeddings")
    started = time.time()
    quantizer = make_quantizer(cfg, seed).fit(emb)
    fit_seconds = time.time() - started
    codes, before, sizes, info = assign_codes(quantizer, emb, cfg)
    quality = quality_report(emb, before, codes, sizes, quantizer, info, categories)
    quality["fit_seconds"] = round(fit_seconds, 2)
    quality["seconds"] = round(time.time() - started, 2)
    return codes, quality, quantizer


def item_embeddings(ctx, num_items: int) -> np.ndarray:
    """What ``sid.embedding`` quantises: text, SASRec's item embeddings, or both rows L2-normalised side by side."""
    parts = []
    for source in ctx.cfg.sid.embedding.split("+"):
        if source == "text":
            path = ctx.input("embed") / "item_emb.npy"
            emb, stage = np.load(path), "embed"
        else:
            from genrec.baselines.sasrec import SASRec

            path = ctx.input("sasrec") / "model.pt"
            emb, stage = SASRec.load(path).item_emb.weight[1:].detach().numpy(), "sasrec"  # padding row dropped
        if len(emb) != num_items:
            raise ValueError(f"{path} has {len(emb)} item rows but the dataset has {num_items} items: rerun '{stage}'")
        parts.append(emb)
    return parts[0] if len(parts) == 1 else np.concatenate([unit_rows(p) for p in parts], axis=1)


def run(ctx) -> dict:
    import pandas as pd

    cfg = ctx.cfg.sid
    items = pd.read_parquet(ctx.input("prepare") / "items.parquet")
    emb = item_embeddings(ctx, len(items))
    categories = items["categories"].fillna("").astype(str).tolist() if "categories" in items.columns else None
    codes, quality, quantizer = build_sids(emb, cfg, ctx.seed, categories)

    buf = io.BytesIO()
    np.save(buf, codes.astype(np.int64))
    atomic_write_bytes(ctx.out / "codes.npy", buf.getvalue())
    write_json(ctx.out / "codebook_sizes.json", quality["codebook_sizes"])
    quantizer.save(ctx.out / QUANTIZER_FILES[cfg.quantizer])
    write_json(ctx.out / "quality.json", quality)
    print(format_quality(quality))
    return {
        "embedding": cfg.embedding,
        "quantizer": cfg.quantizer,
        "codebook_sizes": quality["codebook_sizes"],
        "collision_rate": round(quality["collision_rate"], 5),
        "level0_utilisation": round(quality["usage"][0]["utilisation"], 4),
        "recon_rel": round(quality["recon_rel"], 4),
        "seconds": quality["seconds"],
    }
