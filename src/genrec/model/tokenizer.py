"""Tokenizers that hold the SID tokens: a small BPE trained on item text, or a pretrained one.

The scratch tokenizer is a byte-level BPE (``tokenizers``) trained on the dataset's item
texts, so every string can be encoded (no unknown token) and the text tasks
(``item2sid``, ``sid2title``, ``titles2sid``) have a compact vocabulary. Its ids are laid
out as: the special tokens (``<pad> <bos> <eos> <sep> <answer>`` and one marker per task),
then the BPE vocabulary, then the SID tokens, level by level, so each level is one
contiguous id range (``SIDVocab``).
"""

from __future__ import annotations

from collections.abc import Sequence

from genrec.model.prompt import BASE_SPECIAL_TOKENS, BOS, EOS, PAD, TASK_TOKENS, task_marker
from genrec.model.vocab import SIDVocab, sid_tokens


def build_scratch_tokenizer(texts: Sequence[str], text_vocab_size: int, codebook_sizes: Sequence[int], tasks):
    """A byte-level BPE over ``texts`` with the special tokens and the SID tokens added.

    ``text_vocab_size`` counts the special tokens and the 256 byte symbols; below that
    the vocabulary is just the bytes (enough when no text task is trained).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tasks = list(dict.fromkeys(["seqrec", *tasks]))
    tags = [tag for t in tasks for tag in TASK_TOKENS.get(t, ())]
    special = list(dict.fromkeys([*BASE_SPECIAL_TOKENS, *(task_marker(t) for t in tasks), *tags]))
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    add_sid_tokens(tokenizer, codebook_sizes)
    return tokenizer


def add_sid_tokens(tokenizer, codebook_sizes: Sequence[int]) -> SIDVocab:
    """Add the SID tokens to ``tokenizer`` (a no-op when it already holds them); return their vocabulary.

    They are added as whole tokens that are not "special", so decoding keeps them
    (``<a_3><b_7>`` reads back as written) and they are never split by the BPE.
    """
    from tokenizers import AddedToken

    tokens = sid_tokens(codebook_sizes)
    vocab = tokenizer.get_vocab()
    present = [t in vocab for t in tokens]
    if any(present) and not all(present):
        raise ValueError(
            f"the tokenizer holds {sum(present)} of the {len(tokens)} SID tokens for codebook sizes {list(codebook_sizes)}: "
            "it was extended for other SIDs; start from the original backbone directory"
        )
    if not any(present):
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    return SIDVocab.from_tokenizer(tokenizer, codebook_sizes)


def load_tokenizer(path):
    """A tokenizer saved by ``save_pretrained``, from a local directory only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
