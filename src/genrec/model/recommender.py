"""The generative recommender: a causal LM, its tokenizer, the SID vocabulary and the item trie.

``prompt_batch`` builds the inference prompt of the ``seqrec`` task, ``head + sid(h_1) ...
sid(h_k)`` with the last ``max_history`` items, from the same ids as training (see
``genrec.tasks.seqrec``), left-padded; ``recommend`` decodes it by trie-constrained beam
search. A saved model directory holds:

- the Hugging Face model and tokenizer (``save_pretrained``; LoRA adapters are merged in);
- ``genrec.json``: the SID vocabulary, the prompt format, ``max_history`` and ``sid_softmax``
  (``genrec.model.sid_softmax``: the softmax it was trained under, which every score then uses);
- ``codes.npy`` (N, L): item_id -> SID codes, and ``trie.pt``: the trie built from them;
- ``item_embedding.pt`` with ``model.item_embedding`` (``genrec.model.item_embedding``): the
  item-ID input table, kept out of the Hugging Face checkpoint, which stays a plain causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genrec.io import read_json, write_json
from genrec.model import item_embedding
from genrec.model.prompt import PromptFormat
from genrec.model.vocab import SIDVocab

FORMAT_VERSION = 1
# A model trained under the trie softmax (``sid_softmax``) is written as version 2, so that a genrec
# from before that option refuses it instead of scoring it under the full-vocabulary softmax.
TRIE_FORMAT_VERSION = 2


class GenerativeRecommender:
    def __init__(
        self,
        model,
        tokenizer,
        vocab: SIDVocab,
        trie,
        codes: np.ndarray,
        fmt: PromptFormat,
        max_history: int,
        sid_softmax: str = "vocab",
    ):
        from genrec.model.sid_softmax import check_sid_softmax

        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != vocab.num_levels:
            raise ValueError(f"codes must be (num_items, {vocab.num_levels}), got shape {codes.shape}")
        if trie.num_items != len(codes) or trie.num_levels != vocab.num_levels:
            raise ValueError(
                f"the trie has {trie.num_items} items x {trie.num_levels} levels but the codes are {codes.shape}"
            )
        self.model, self.tokenizer, self.vocab, self.trie = model, tokenizer, vocab, trie
        self.codes, self.fmt, self.max_history = codes, fmt, max_history
        self.sid_softmax = check_sid_softmax(sid_softmax)  # how every SID score is normalised (trained so)
        self.sid_ids = vocab.sid_to_ids(codes)  # (N, L) token ids of each item's SID
        items = item_embedding.find(model)
        if items is not None and not np.array_equal(items.sid_ids, self.sid_ids):
            raise ValueError("the model's item-ID input table was built for other SIDs than these codes")

    def check_free_text(self, what: str) -> None:
        """Refuse a model trained under the trie softmax for ``what``, which writes SIDs inside free text.

        Text is sampled from the full-vocabulary softmax, which the trie loss does not train at
        SID positions, so such a model's rationales and answers (GREAM, DeepRec) are unsupported.
        """
        if self.sid_softmax != "vocab":
            raise ValueError(
                f"{what} writes SIDs inside free text, which a model trained with sft.sid_softmax={self.sid_softmax} "
                "never learnt to do: train it with sft.sid_softmax=vocab"
            )

    @property
    def num_items(self) -> int:
        return len(self.codes)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt_ids(self, history: Sequence[int]) -> list[int]:
        """The ids of one user's prompt: the seqrec head, then the SIDs of the last max_history items."""
        items = np.asarray(history, dtype=np.int64)[-self.max_history :] if len(history) else np.zeros(0, np.int64)
        if len(items) and (items.min() < 0 or items.max() >= self.num_items):
            bad = items[(items < 0) | (items >= self.num_items)][0]
            raise ValueError(f"history holds item_id {int(bad)}, outside the model's {self.num_items} items")
        return self.fmt.head("seqrec") + self.sid_ids[items].reshape(-1).tolist()

    def prompt_batch(self, histories: Sequence[Sequence[int]]):
        """Left-padded ``(input_ids, attention_mask)``, each (B, T) long, on the model's device."""
        import torch

        rows = [self.prompt_ids(h) for h in histories]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.fmt.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row) :] = torch.as_tensor(row)
            attention_mask[b, width - len(row) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def recommend(self, histories: Sequence[Sequence[int]], num_beams: int = 20, k: int = 20):
        """The top ``k`` items per history by constrained beam search (``BeamOutput``, best first)."""
        from genrec.decode.beam import constrained_beam_search

        input_ids, attention_mask = self.prompt_batch(histories)
        with _eval_mode(self.model):
            return constrained_beam_search(
                self.model,
                input_ids,
                attention_mask,
                self.trie,
                self.vocab.offsets,
                num_beams=num_beams,
                num_return=k,
                sid_softmax=self.sid_softmax,
            )

    def sample(self, histories: Sequence[Sequence[int]], num_samples: int, temperature: float = 1.0, generator=None):
        """``num_samples`` items per history drawn inside the trie (RL rollouts); the model's mode is kept."""
        from genrec.decode.beam import constrained_sample

        input_ids, attention_mask = self.prompt_batch(histories)
        return constrained_sample(
            self.model,
            input_ids,
            attention_mask,
            self.trie,
            self.vocab.offsets,
            num_samples,
            temperature,
            generator,
            sid_softmax=self.sid_softmax,
        )

    def save(self, model_dir: str | Path) -> None:
        """Write the model directory; a PEFT model is merged into its base first (and stays merged)."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        items = item_embedding.find(self.model)
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
            if items is not None:  # merging replaces the wrapped input embedding that held the table
                item_embedding.attach(self.model, items)
        with item_embedding.detached(self.model):
            self.model.save_pretrained(model_dir)
        if items is not None:
            items.save(model_dir / item_embedding.FILENAME)
        self.tokenizer.save_pretrained(model_dir)
        np.save(model_dir / "codes.npy", self.codes)
        self.trie.save(model_dir / "trie.pt")
        write_json(
            model_dir / "genrec.json",
            {
                "format_version": FORMAT_VERSION if self.sid_softmax == "vocab" else TRIE_FORMAT_VERSION,
                "sid_vocab": self.vocab.to_json(),
                "prompt_format": self.fmt.to_json(),
                "max_history": self.max_history,
                "num_items": self.num_items,
                "sid_softmax": self.sid_softmax,
            },
        )

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None) -> GenerativeRecommender:
        """A saved model directory, in eval mode, on ``device`` (default: cuda when available, else cpu)."""
        import torch
        from transformers import AutoModelForCausalLM

        from genrec.model.tokenizer import load_tokenizer
        from genrec.sid.trie import SIDTrie

        model_dir = Path(model_dir)
        meta_path = model_dir / "genrec.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {model_dir} is not a genrec model directory (run 'sft')")
        meta = read_json(meta_path)
        if meta.get("layout") == "items":
            raise ValueError(
                f"{meta_path}: an item-layout model (model.layout: items); genrec.model.item_layout.load reads it, "
                "and of the stages only sft and eval (and 'genrec recommend') support it"
            )
        sid_softmax = meta.get("sid_softmax", "vocab")  # absent before sid_softmax existed: all were "vocab"
        version = TRIE_FORMAT_VERSION if sid_softmax == "trie" else FORMAT_VERSION
        if meta.get("format_version") != version:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')} with sid_softmax {sid_softmax!r}; this "
                f"genrec reads format_version {FORMAT_VERSION} (sid_softmax 'vocab') and {TRIE_FORMAT_VERSION} ('trie')"
            )
        tokenizer = load_tokenizer(model_dir)
        vocab = SIDVocab.from_json(meta["sid_vocab"])
        if SIDVocab.from_tokenizer(tokenizer, vocab.codebook_sizes).offsets != vocab.offsets:
            raise ValueError(f"{meta_path}: the SID offsets do not match the tokenizer saved beside it")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="sdpa")
        if (model_dir / item_embedding.FILENAME).is_file():
            vocab_size = model.get_input_embeddings().weight.shape[0]
            item_embedding.attach(
                model, item_embedding.ItemEmbedding.load(model_dir / item_embedding.FILENAME, vocab_size)
            )
        model.to(device).eval()
        codes = np.load(model_dir / "codes.npy")
        trie = SIDTrie.load(model_dir / "trie.pt").to(device)
        fmt = PromptFormat.from_json(meta["prompt_format"])
        return cls(model, tokenizer, vocab, trie, codes, fmt, meta["max_history"], sid_softmax)


class _eval_mode:
    """Eval mode inside the block (dropout off, so beams are deterministic), the previous mode after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
