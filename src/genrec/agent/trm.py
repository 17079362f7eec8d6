"""DeepRec's preference-aware traditional recommender (TRM): the tool the LLM agent calls.

The agent writes a free-text preference ("Drama; Romance"); the TRM retrieves candidates
for (history, preference) over the full catalogue:

- item i is ``e_i = id_emb[i] + adaptor(t_i)``, where ``t_i`` is the frozen text embedding of
  the item from the ``embed`` stage (``embed/item_emb.npy``) and the adaptor a small MLP;
- a Transformer over the last ``max_history`` items gives ``h_last``;
- the preference is cut into phrases, each embedded by the same sentence encoder as the items
  (``embed/encoder.json``), and ``q = adaptor(normalise(mean of the phrase embeddings))``;
  with no preference ``q = 0``;
- the query is ``LayerNorm(h_last + q)`` and item i scores ``cos(query, e_i) / temperature``.

DeepRec does not publish how its TRM was trained. Here: next-item full-softmax cross-entropy,
one pass per training window as SASRec (``genrec.baselines.sasrec``), where each position's
``q`` is, with probability ``1 - text_dropout``, built from a random non-empty subset of its
*target* item's labels (the informative category labels, as GREAM's chains use them), else 0.
So text steers what comes back, and the TRM still ranks well with no text. The encoder is
never called per example: every distinct label is embedded once before training.

DeepRec's history encoder is bidirectional; this one is causal so that one forward pass trains
every position of a window. At inference only the last position is read, and it sees the whole
history either way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from genrec.baselines.sasrec import causal_encode, training_windows
from genrec.config import TRMConfig
from genrec.data.dataset import Dataset
from genrec.io import read_json, write_json
from genrec.methods.gream.chains import item_labels

log = logging.getLogger("genrec")

# --------------------------------------------------------------------------- phrases


def preference_phrases(categories: Sequence[str], max_share: float) -> list[tuple[str, ...]]:
    """Each item's phrases: its informative category labels (those on <= max_share of the items).

    >>> preference_phrases(["Movies, Drama, Romance", "Movies, Horror", "Movies"], 0.5)
    [('Drama', 'Romance'), ('Horror',), ()]
    """
    return item_labels(categories, max_share)


def clean_phrase(phrase: str, phrase_chars: int = 64) -> str:
    """One phrase as the TRM reads it: inner whitespace collapsed, cut to phrase_chars (on a word if possible).

    >>> clean_phrase("  romantic   comedies of the nineties ", 20)
    'romantic comedies of'
    """
    phrase = " ".join(phrase.split())
    if len(phrase) <= phrase_chars:
        return phrase
    cut = phrase[:phrase_chars]
    if phrase[phrase_chars] != " " and " " in cut:  # the cut falls inside a word: drop that word
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip()


def split_preference(text: str | None, max_phrases: int = 4, phrase_chars: int = 64) -> list[str]:
    """A preference string -> its phrases: split on ";" (and newlines), stripped, empties and repeats dropped.

    Repeats are found case-insensitively (the first spelling stays); at most ``max_phrases`` are kept.

    >>> split_preference("Drama; Romance ;; drama;")
    ['Drama', 'Romance']
    """
    if not text:
        return []
    out: dict[str, str] = {}
    for part in re.split(r"[;\n]", text):
        phrase = clean_phrase(part, phrase_chars)
        if phrase and phrase.casefold() not in out:
            out[phrase.casefold()] = phrase
    return list(out.values())[:max_phrases]


class PhraseEncoder:
    """Embeds phrases with the embed stage's encoder, each distinct phrase once per process.

    ``encode(texts) -> (B, D)`` float32, L2-normalised. ``encode_fn`` is any
    ``list[str] -> (B, D)`` (tests pass a fake); :meth:`from_embed_dir` loads the real one.
    """

    def __init__(self, encode_fn: Callable[[list[str]], np.ndarray], batch_size: int = 256):
        self._encode_fn = encode_fn
        self.batch_size = batch_size
        self.cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_embed_dir(cls, embed_dir: str | Path, device: str = "") -> PhraseEncoder:
        """The encoder recorded in ``embed_dir/encoder.json`` (loaded on the first call to encode)."""
        from genrec.text.encode import TextEncoder

        info = read_json(Path(embed_dir) / "encoder.json")
        # The fingerprint ends in "-t<max_tokens>": the truncation the items were embedded with.
        found = re.search(r"-t(\d+)$", info["fingerprint"])
        max_tokens = int(found.group(1)) if found else 256
        loaded: list = []

        def encode(texts: list[str]) -> np.ndarray:
            if not loaded:
                enc = TextEncoder(info["name"], max_tokens, device)
                if enc.fingerprint != info["fingerprint"]:
                    raise ValueError(
                        f"the encoder {info['name']!r} is not the one that embedded the items "
                        f"({enc.fingerprint} != {info['fingerprint']} in {embed_dir}/encoder.json): rerun the embed stage"
                    )
                loaded.append(enc)
            return loaded[0].encode(texts)

        return cls(encode)

    def encode(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            emb = np.asarray(self._encode_fn(chunk), dtype=np.float32)  # (b, D)
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            self.cache.update(zip(chunk, emb))
        if not texts:
            dim = next(iter(self.cache.values())).shape[0] if self.cache else 0
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])


@dataclass
class ItemPhrases:
    """Every item's phrases, embedded once: what training draws its preferences from."""

    phrases: list[str]  # (M,) the distinct phrases
    emb: np.ndarray  # (M, D) float32, L2-normalised
    ids: np.ndarray  # (N, L) int64: item i's phrases as rows of emb, -1 pads


def item_phrases(labels: Sequence[tuple[str, ...]], encode: Callable[[list[str]], np.ndarray], phrase_chars: int = 64):
    """Embed the distinct phrases of ``labels`` (one tuple per item) once -> :class:`ItemPhrases`."""
    cleaned = [list(dict.fromkeys(p for p in (clean_phrase(x, phrase_chars) for x in labs) if p)) for labs in labels]
    phrases = sorted({p for labs in cleaned for p in labs})
    row = {p: i for i, p in enumerate(phrases)}
    width = max((len(labs) for labs in cleaned), default=0)
    ids = np.full((len(cleaned), width), -1, dtype=np.int64)
    for i, labs in enumerate(cleaned):
        ids[i, : len(labs)] = [row[p] for p in labs]
    emb = encode(phrases) if phrases else np.zeros((0, 0), dtype=np.float32)
    return ItemPhrases(phrases, np.asarray(emb, dtype=np.float32), ids)


def sample_preferences(
    targets: torch.Tensor, ids: torch.Tensor, emb: torch.Tensor, text_dropout: float, dim: int
) -> torch.Tensor:
    """Training preferences (P, D) for targets (P,): a random non-empty subset of each target's phrases.

    Normalised mean of the subset's embeddings, or a zero row (no preference) with probability
    ``text_dropout`` and for targets without phrases. Draws from the global torch generator, which
    the training checkpoint saves, so a resumed run draws the same subsets.
    """
    P = len(targets)
    if ids.shape[1] == 0:
        return torch.zeros(P, dim)
    own = ids[targets]  # (P, L) -1 pads
    valid = own >= 0
    pick = (torch.rand(own.shape) < 0.5) & valid
    # Where the coin flips picked nothing, take one phrase at random.
    one = F.one_hot(torch.rand(own.shape).masked_fill(~valid, -1.0).argmax(1), own.shape[1]).bool()  # (P, L)
    pick |= one & valid & ~pick.any(1, keepdim=True)
    pick &= (torch.rand(P) >= text_dropout).unsqueeze(1)
    summed = F.embedding_bag(own.clamp(min=0), emb, per_sample_weights=pick.float(), mode="sum")
    return F.normalize(summed, dim=-1)  # the mean's direction; zero rows stay zero


# --------------------------------------------------------------------------- the model


class PreferenceTRM(nn.Module):
    """Item ids are shifted by one inside the model: 0 is padding."""

    def __init__(
        self,
        item_text: np.ndarray | torch.Tensor,
        max_len: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.3,
        temperature: float = 0.05,
    ):
        super().__init__()
        item_text = torch.as_tensor(np.asarray(item_text), dtype=torch.float32)
        N, D = item_text.shape
        self.num_items, self.text_dim, self.max_len, self.temperature = N, D, max_len, temperature
        self.register_buffer("item_text", item_text)  # (N, D) frozen; saved so model.pt stands alone
        self.id_emb = nn.Embedding(N + 1, hidden_size, padding_idx=0)
        self.adaptor = nn.Sequential(nn.Linear(D, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.query_norm = nn.LayerNorm(hidden_size)
        self.apply(self._init)
        # The adaptor keeps PyTorch's default init: at std 0.02 its output would be ~1e-3, so the text
        # would neither separate the items nor move the query at the start, and training stalls.
        for lin in self.adaptor:
            if isinstance(lin, nn.Linear):
                lin.reset_parameters()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def item_reps(self) -> torch.Tensor:
        """Item representations (N, H): ID embedding + adaptor(text embedding)."""
        return self.id_emb.weight[1:] + self.adaptor(self.item_text)

    def forward(self, seq: torch.Tensor, reps: torch.Tensor | None = None) -> torch.Tensor:
        """seq (B, T) shifted ids, left-padded with 0 -> hidden states (B, T, H)."""
        reps = self.item_reps() if reps is None else reps
        B, T = seq.shape
        table = torch.cat([reps.new_zeros(1, reps.shape[1]), reps])  # (N + 1, H): row 0 is padding
        pos = torch.arange(T, device=seq.device).expand(B, T)
        # No sqrt(H) scaling as in SASRec: the items are O(1) through the adaptor already, and a
        # scaled h drowns q in LayerNorm(h + q): on the synthetic data of tests/test_trm.py, recall@5
        # with the right phrase was 0.1-0.5 with the scaling and 0.95-1.0 without it.
        x = table[seq] + self.pos_emb(pos)  # (B, T, H)
        x = self.emb_dropout(x)
        return causal_encode(self.encoder, x, seq == 0)  # SASRec's mask: future and padding keys blocked

    def query(self, h: torch.Tensor, pref_emb: torch.Tensor | None) -> torch.Tensor:
        """LayerNorm(h + q) (..., H); q = adaptor(pref_emb), and q = 0 where pref_emb is None or a zero row."""
        if pref_emb is None:
            return self.query_norm(h)
        pref_emb = pref_emb.to(h.device, torch.float32)
        has_text = (pref_emb.abs().sum(-1, keepdim=True) > 0).to(h.dtype)  # (..., 1)
        return self.query_norm(h + self.adaptor(pref_emb) * has_text)

    def logits(self, query: torch.Tensor, reps: torch.Tensor | None = None) -> torch.Tensor:
        """query (..., H) -> cosine / temperature over the catalogue (..., N), item_id order."""
        reps = self.item_reps() if reps is None else reps
        return F.normalize(query, dim=-1) @ F.normalize(reps, dim=-1).T / self.temperature

    def _batch(self, histories: list[np.ndarray]) -> torch.Tensor:
        device = self.id_emb.weight.device
        seq = torch.zeros(len(histories), self.max_len, dtype=torch.long, device=device)
        for b, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-self.max_len :]
            if len(h):
                seq[b, -len(h) :] = torch.as_tensor(h + 1, device=device)
        return seq

    @torch.no_grad()
    def score(self, histories: list[np.ndarray], pref_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N) for the next item of each history; pref_emb (B, D) text embeddings, zero row = none."""
        reps = self.item_reps()
        h = self.forward(self._batch(histories), reps)[:, -1]  # (B, H)
        return self.logits(self.query(h, pref_emb), reps)

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """L2-normalised item representations (N, H): the TRM's item-to-item geometry."""
        return F.normalize(self.item_reps(), dim=-1)

    def save(self, path: str | Path) -> None:
        cfg = {
            "max_len": self.max_len,
            "hidden_size": self.id_emb.embedding_dim,
            "num_layers": len(self.encoder.layers),
            "num_heads": self.encoder.layers[0].self_attn.num_heads,
            "dropout": self.emb_dropout.p,
            "temperature": self.temperature,
        }
        torch.save({"config": cfg, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> PreferenceTRM:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(blob["state_dict"]["item_text"], **blob["config"])
        model.load_state_dict(blob["state_dict"])
        return model.eval()


# --------------------------------------------------------------------------- what the agent calls


def top_items(
    scores: torch.Tensor, n: int, exclude: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n item_ids (B, n) int64 and scores (B, n) float32 of logits (B, N), best first, ties by
    item id; items in ``exclude[b]`` never, and id -1 with score -inf where fewer than n remain."""
    from genrec.eval.evaluate import topk_from_scores

    scores = scores.float().cpu().clone()  # (B, N)
    for b, items in enumerate(exclude if exclude is not None else []):
        scores[b, torch.from_numpy(np.array(items, dtype=np.int64))] = -torch.inf
    ids = topk_from_scores(scores, [], n, exclude_seen=False)  # (B, n), ties by item id
    top = scores.gather(1, torch.from_numpy(ids)).numpy()
    ids[np.isneginf(top)] = -1
    return ids, top.astype(np.float32)


class Retriever:
    """The agent's tool: (histories, preferences) -> the TRM's top-n items, batched into one forward pass."""

    def __init__(
        self,
        model: PreferenceTRM,
        encoder: PhraseEncoder,
        titles: list[str],
        categories: list[str],
        max_phrases: int = 4,
        phrase_chars: int = 64,
    ):
        if not len(titles) == len(categories) == model.num_items:
            raise ValueError(
                f"{len(titles)} titles and {len(categories)} category strings for a TRM of {model.num_items} items"
            )
        self.model, self.encoder = model.eval(), encoder
        self.titles, self.categories = titles, categories
        self.max_phrases, self.phrase_chars = max_phrases, phrase_chars

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "") -> Retriever:
        """The TRM of ``run_dir/trm``, the encoder of ``run_dir/embed`` and the items of ``run_dir/prepare``."""
        import pandas as pd

        run_dir = Path(run_dir)
        path = run_dir / "trm" / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the 'trm' stage first")
        done = run_dir / "trm" / "done.json"
        cfg = TRMConfig(**read_json(done)["config"]["trm"]) if done.is_file() else TRMConfig()
        items = pd.read_parquet(run_dir / "prepare" / "items.parquet")
        model = PreferenceTRM.load(path)
        encoder = PhraseEncoder.from_embed_dir(run_dir / "embed", device)
        return cls(
            model,
            encoder,
            items["title"].fillna("").astype(str).tolist(),
            items["categories"].fillna("").astype(str).tolist(),
            cfg.max_phrases,
            cfg.phrase_chars,
        )

    @property
    def num_items(self) -> int:
        return self.model.num_items

    def phrases(self, preference: str | None) -> list[str]:
        """The phrases the TRM reads from one preference string."""
        return split_preference(preference, self.max_phrases, self.phrase_chars)

    def embed_preferences(self, preferences: Sequence[str | None]) -> torch.Tensor:
        """(B, D): the normalised mean of each preference's phrase embeddings; a zero row where it has none."""
        phrases = [self.phrases(p) for p in preferences]
        flat = [p for ps in phrases for p in ps]
        out = torch.zeros(len(preferences), self.model.text_dim)
        if flat:
            emb = torch.from_numpy(self.encoder.encode(flat))  # (M, D), one call for the batch
            row = torch.repeat_interleave(torch.arange(len(phrases)), torch.tensor([len(ps) for ps in phrases]))
            out.index_add_(0, row, emb)
        return F.normalize(out, dim=-1)

    def score(self, histories: list[np.ndarray], preferences: Sequence[str | None] | None = None) -> torch.Tensor:
        """Logits (B, N) over the catalogue (the eval harness's ranker)."""
        pref = None if preferences is None else self.embed_preferences(preferences)
        return self.model.score(histories, pref)

    def retrieve(
        self,
        histories: list[np.ndarray],
        preferences: Sequence[str | None],
        n: int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n item_ids (B, n) int64 and their scores (B, n) float32, best first, ties by item id.

        Items in ``exclude[b]`` are never returned; where fewer than n items remain, the row ends
        in item id -1 with score -inf.
        """
        if len(preferences) != len(histories):
            raise ValueError(f"{len(histories)} histories but {len(preferences)} preferences")
        if not 1 <= n <= self.num_items:
            raise ValueError(f"n must be in [1, {self.num_items}] (the catalogue size), got {n}")
        if exclude is not None and len(exclude) != len(histories):
            raise ValueError(f"{len(histories)} histories but {len(exclude)} exclude lists")
        return top_items(self.score(histories, preferences), n, exclude)

    def item_vectors(self) -> torch.Tensor:
        """(N, H) L2-normalised TRM item representations."""
        return self.model.item_vectors()


# --------------------------------------------------------------------------- training


def train_trm(
    dataset: Dataset,
    item_emb: np.ndarray,
    phrase_emb_of_item: ItemPhrases,
    cfg: TRMConfig,
    max_history: int,
    seed: int,
    work_dir: Path,
) -> tuple[PreferenceTRM, list[dict]]:
    """Train with early stopping on valid NDCG@10 (no preference); resumes from ``work_dir/checkpoint.pt``.

    ``item_emb`` (N, D) is the frozen item text embedding; ``phrase_emb_of_item`` the phrases the
    training preferences are drawn from (:func:`item_phrases`).
    """

    if item_emb.shape[0] != dataset.num_items:
        raise ValueError(f"item_emb has {item_emb.shape[0]} rows for {dataset.num_items} items: rerun the embed stage")
    phrases = phrase_emb_of_item
    if len(phrases.phrases) and phrases.emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"phrase embeddings are {phrases.emb.shape[1]}-d but item embeddings {item_emb.shape[1]}-d: "
            "embed both with the same encoder"
        )
    from genrec.train.epochs import fit_epochs, valid_ndcg

    torch.manual_seed(seed)
    model = PreferenceTRM(
        item_emb, max_history, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dropout, cfg.temperature
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    inputs, targets = training_windows(dataset.train_sequences(), max_history)
    inputs_t, targets_t = torch.as_tensor(inputs), torch.as_tensor(targets)
    phrase_ids = torch.as_tensor(phrases.ids)
    phrase_emb = torch.as_tensor(phrases.emb)
    valid = dataset.examples("valid")

    def train_epoch(epoch: int) -> dict:
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the same batches; the
        # preference draws come from the torch RNG, which the checkpoint restores.
        perm = torch.randperm(len(inputs_t), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        total, count, total_text, count_text = 0.0, 0, 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            seq, tgt = inputs_t[idx], targets_t[idx]
            reps = model.item_reps()  # (N, H), once per batch
            h = model(seq, reps)  # (B, T, H)
            keep = tgt > 0
            tk = tgt[keep] - 1  # (P,) item ids of the real positions
            pref = sample_preferences(tk, phrase_ids, phrase_emb, cfg.text_dropout, model.text_dim)  # (P, D)
            logits = model.logits(model.query(h[keep], pref), reps)  # (P, N)
            losses = F.cross_entropy(logits, tk, reduction="none")
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with_text = pref.abs().sum(1) > 0
            total += losses.sum().item()
            count += len(losses)
            total_text += losses[with_text].sum().item()
            count_text += int(with_text.sum())
        return {"loss": total / max(count, 1), "loss_with_text": total_text / max(count_text, 1)}

    # Valid NDCG@10 without a preference: what the TRM alone gives.
    curves = fit_epochs("trm", model, opt, train_epoch, lambda: valid_ndcg(model.score, valid), cfg, work_dir)
    return model, curves


# --------------------------------------------------------------------------- does text steer?


def steer_check(
    retriever: Retriever, dataset: Dataset, labels: Sequence[tuple[str, ...]], seed: int, k: int = 20, batch: int = 256
) -> dict:
    """Recall@k of the valid target with no preference, its own phrases (oracle) and another item's (adversarial).

    Over valid users whose target has phrases; the adversarial preference is the phrases of a
    uniformly drawn other item that has some. Seen items are excluded, as in the evaluation.
    """
    valid = dataset.examples("valid")
    rows = np.flatnonzero([len(labels[t]) > 0 for t in valid.targets])
    with_phrases = np.flatnonzero([len(lab) > 0 for lab in labels])
    rng = np.random.default_rng(seed)
    own = ["; ".join(labels[valid.targets[r]]) for r in rows]
    other = []
    for r in rows:
        j = valid.targets[r]
        while j == valid.targets[r] and len(with_phrases) > 1:
            j = int(rng.choice(with_phrases))
        other.append("; ".join(labels[j]))
    result = {"k": k, "users": int(len(rows)), "valid_users": len(valid)}
    for name, prefs in (("none", [None] * len(rows)), ("own", own), ("other", other)):
        hits = 0
        for s in range(0, len(rows), batch):
            sl = rows[s : s + batch]
            ids, _ = retriever.retrieve(
                [valid.histories[r] for r in sl], prefs[s : s + batch], k, [valid.seen[r] for r in sl]
            )
            hits += int((ids == valid.targets[sl, None]).any(1).sum())
        result[f"recall@{k}_{name}"] = hits / max(len(rows), 1)
    return result


# --------------------------------------------------------------------------- the stage


def run(ctx) -> dict:
    from genrec.eval.evaluate import evaluate

    cfg: TRMConfig = ctx.cfg.trm
    dataset = Dataset.load(ctx.input("prepare"), ctx.cfg.data.max_history)
    item_emb = np.load(ctx.input("embed") / "item_emb.npy").astype(np.float32)
    encoder = PhraseEncoder.from_embed_dir(ctx.input("embed"))
    labels = preference_phrases(dataset.categories, cfg.max_label_share)
    phrases = item_phrases(labels, encoder.encode, cfg.phrase_chars)
    log.info(
        "trm: %d distinct phrases; %d of %d items have some",
        len(phrases.phrases),
        int((phrases.ids >= 0).any(1).sum()) if phrases.ids.size else 0,
        dataset.num_items,
    )
    started = time.time()
    model, curves = train_trm(dataset, item_emb, phrases, cfg, ctx.cfg.data.max_history, ctx.seed, ctx.work)
    train_seconds = time.time() - started
    model.save(ctx.out / "model.pt")
    write_json(ctx.out / "curves.json", curves)
    result = evaluate(
        lambda h: model.score(h), dataset, ctx.cfg.eval, ctx.out / "eval", seed=ctx.seed, model_name="trm"
    )
    retriever = Retriever(model, encoder, dataset.titles, dataset.categories, cfg.max_phrases, cfg.phrase_chars)
    steer = steer_check(retriever, dataset, labels, ctx.seed)
    write_json(ctx.out / "steer.json", steer)
    print(
        f"trm: test ndcg@10 {result['test']['ndcg@10']:.4f}; valid recall@20 with no text {steer['recall@20_none']:.4f}, "
        f"own phrases {steer['recall@20_own']:.4f}, another item's {steer['recall@20_other']:.4f}"
    )
    return {
        "test_ndcg@10": result["test"]["ndcg@10"],
        "test_hr@10": result["test"]["hr@10"],
        "best_valid_ndcg@10": max((r.get("valid_ndcg@10", -1) for r in curves), default=-1),
        **{key: v for key, v in steer.items() if key.startswith("recall")},
        "epochs": len(curves),
        "train_seconds": round(train_seconds, 1),
    }
