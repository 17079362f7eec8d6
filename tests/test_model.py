"""The SID vocabulary, the scratch tokenizer, the backbones (scratch, local pretrained, LoRA) and the recommender."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.model.backbone import (  # noqa: E402
    add_residual_dropout,
    build_scratch_model,
    pretrained_backbone,
    scratch_backbone,
)
from genrec.model.prompt import PromptFormat  # noqa: E402
from genrec.model.recommender import GenerativeRecommender  # noqa: E402
from genrec.model.tokenizer import build_scratch_tokenizer  # noqa: E402
from genrec.model.vocab import SIDVocab  # noqa: E402
from genrec.sid.trie import SIDTrie  # noqa: E402

SIZES = [4, 4, 3]
TEXTS = ["Toy Story (1995). Animation, Comedy", "GoldenEye (1995). Action, Thriller", "Red matte lipstick"] * 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_codes(num_items: int = 20, seed: int = 0) -> np.ndarray:
    flat = np.random.default_rng(seed).choice(int(np.prod(SIZES)), size=num_items, replace=False)
    return np.stack(np.unravel_index(flat, SIZES), axis=1).astype(np.int64)  # (N, 3)


def model_cfg(*overrides: str):
    base = [
        "run_dir=x",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.intermediate_size=64",
        "model.text_vocab_size=300",
    ]
    return load_config(None, base + list(overrides)).model


def scratch(tasks=("seqrec",), dropout: float = 0.0):
    tokenizer = build_scratch_tokenizer(TEXTS, 300, SIZES, tasks)
    return scratch_backbone(model_cfg(f"model.dropout={dropout}"), tokenizer, SIZES, tasks, seed=0)


def save_tiny_pretrained(path, tied: bool) -> None:
    """A tiny 'pretrained' Qwen2 and its byte-level BPE tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS + ["Which item comes next? Answer:"], trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        eos_token_id=hf_tok.eos_token_id,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    hf_tok.save_pretrained(path)


# --------------------------------------------------------------------------- SIDVocab


def test_sid_vocab_maps_codes_to_contiguous_ids_and_back():
    vocab = SIDVocab([4, 4, 3], [10, 14, 18])
    assert vocab.token(2, 7) == "<c_7>"
    assert vocab.all_tokens()[:5] == ["<a_0>", "<a_1>", "<a_2>", "<a_3>", "<b_0>"]
    assert vocab.all_token_ids() == list(range(10, 21))
    assert vocab.sid_string([1, 3, 2]) == "<a_1><b_3><c_2>"
    codes = np.array([[1, 3, 2], [0, 0, 0]])
    assert vocab.sid_to_ids(codes).tolist() == [[11, 17, 20], [10, 14, 18]]
    assert vocab.ids_to_sid(torch.tensor([[11, 17, 20]])).tolist() == [[1, 3, 2]]
    assert SIDVocab.from_json(vocab.to_json()).offsets == [10, 14, 18]
    with pytest.raises(ValueError, match="outside their level"):
        vocab.ids_to_sid(np.array([[11, 11, 20]]))  # 11 is a level-0 token in the level-1 slot
    with pytest.raises(ValueError, match="overlap"):
        SIDVocab([4, 4], [10, 12])


# --------------------------------------------------------------------------- tokenizer


def test_scratch_tokenizer_has_whole_contiguous_sid_tokens_and_round_trips_text():
    tok = build_scratch_tokenizer(TEXTS, 300, SIZES, ["seqrec", "item2sid"])
    vocab = SIDVocab.from_tokenizer(tok, SIZES)
    # The SID tokens come after the text vocabulary, one level after the other.
    assert vocab.offsets == [len(tok) - 11, len(tok) - 7, len(tok) - 3]
    ids = tok("GoldenEye <a_1><b_3><c_2> lipstick", add_special_tokens=False)["input_ids"]
    assert vocab.sid_to_ids(np.array([1, 3, 2])).tolist() == [i for i in ids if i >= vocab.offsets[0]]
    assert tok.decode(ids) == "GoldenEye <a_1><b_3><c_2> lipstick"
    fmt = PromptFormat.markers(tok, ["item2sid"])
    assert tok.convert_ids_to_tokens(fmt.head("seqrec")) == ["<bos>", "<seqrec>"]
    assert tok.convert_ids_to_tokens(fmt.head("item2sid")) == ["<bos>", "<item2sid>"]
    assert tok.convert_ids_to_tokens(fmt.answer + [fmt.eos_id, fmt.pad_id]) == ["<answer>", "<eos>", "<pad>"]


def test_residual_dropout_is_random_in_train_mode_only():
    model = build_scratch_model(model_cfg(), build_scratch_tokenizer(TEXTS, 300, SIZES, ["seqrec"]), seed=0)
    add_residual_dropout(model, 0.5)
    ids = torch.tensor([[1, 5, 300, 301]])
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------- pretrained backbones


def test_backbone_that_is_not_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not an existing directory.*never downloads"):
        pretrained_backbone(model_cfg("model.backbone=Qwen/Qwen2.5-0.5B"), SIZES, ["seqrec"])
    with pytest.raises(ConfigError, match="config.json is missing"):
        pretrained_backbone(model_cfg(f"model.backbone={tmp_path}"), SIZES, ["seqrec"])
    with pytest.raises(ConfigError, match="lora_r > 0 needs a pretrained"):
        model_cfg("model.lora_r=4")


@pytest.mark.parametrize("tied", [True, False])
def test_pretrained_backbone_gets_sid_rows_at_the_mean_embedding(tmp_path, tied):
    save_tiny_pretrained(tmp_path, tied)
    original = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path)
    old_in = original.get_input_embeddings().weight.detach()  # (V_old, H)
    old_out = original.get_output_embeddings().weight.detach()
    bb = pretrained_backbone(model_cfg(f"model.backbone={tmp_path}"), SIZES, ["seqrec", "item2sid"])
    n_old = old_in.shape[0]
    assert bb.vocab.offsets == [n_old, n_old + 4, n_old + 8] and len(bb.tokenizer) == n_old + 11
    new_in = bb.model.get_input_embeddings().weight.detach()
    new_out = bb.model.get_output_embeddings().weight.detach()
    assert new_in.shape == (n_old + 11, 32)
    torch.testing.assert_close(new_in[:n_old], old_in)
    torch.testing.assert_close(new_in[n_old:], old_in.mean(0).expand(11, -1))
    torch.testing.assert_close(new_out[n_old:], old_out.mean(0).expand(11, -1))
    assert bb.fmt.style == "instructions"
    assert bb.tokenizer.decode(bb.fmt.head("seqrec")).startswith("Here is the history")


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_adapters_and_sid_rows_only_and_merges_on_save(tmp_path, tied):
    save_tiny_pretrained(tmp_path / "base", tied)
    bb = pretrained_backbone(model_cfg(f"model.backbone={tmp_path / 'base'}", "model.lora_r=4"), SIZES, ["seqrec"])
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    # The LM head's SID rows train too: through the tied embedding, or their own delta when untied.
    assert sum("trainable_tokens_delta" in n for n in trainable) == (1 if tied else 2)

    codes = random_codes(10)
    rec = GenerativeRecommender(bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, 5)
    all_ids = torch.arange(len(bb.tokenizer))
    embed_before = bb.model.get_input_embeddings()(all_ids).detach()  # (V, H)
    opt = torch.optim.SGD([p for p in bb.model.parameters() if p.requires_grad], lr=0.5)
    ids, mask = rec.prompt_batch([[1, 2], [3]])
    for _ in range(3):
        logits = bb.model(input_ids=ids, attention_mask=mask).logits[:, -1]  # (B, V)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([bb.vocab.offsets[0] + 1] * 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.model.eval()
    merged_in = bb.model.get_input_embeddings()(all_ids).detach()
    first_sid = bb.vocab.offsets[0]
    torch.testing.assert_close(merged_in[:first_sid], embed_before[:first_sid])  # text rows untouched
    assert not torch.allclose(merged_in[first_sid:], embed_before[first_sid:])  # SID rows trained
    before = rec.recommend([[1, 2], [3]], num_beams=5, k=5)
    rec.save(tmp_path / "saved")
    loaded = GenerativeRecommender.load(tmp_path / "saved", device="cpu")
    after = loaded.recommend([[1, 2], [3]], num_beams=5, k=5)
    assert torch.equal(before.items, after.items)
    torch.testing.assert_close(before.scores, after.scores, atol=1e-5, rtol=1e-5)  # merging rounds differently


# --------------------------------------------------------------------------- recommender


def test_prompt_batch_is_left_padded_seqrec_head_plus_history_sids():
    bb = scratch()
    codes = random_codes()
    rec = GenerativeRecommender(bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, max_history=2)
    ids, mask = rec.prompt_batch([[4, 5, 6], [7]])
    head = bb.fmt.head("seqrec")
    sid = bb.vocab.sid_to_ids(codes)  # (N, 3)
    assert ids[0].tolist() == head + sid[5].tolist() + sid[6].tolist()  # the last max_history items
    assert ids[1].tolist() == [bb.fmt.pad_id] * 3 + head + sid[7].tolist()
    assert mask.tolist() == [[1] * 8, [0] * 3 + [1] * 5]
    with pytest.raises(ValueError, match="item_id 20, outside the model's 20 items"):
        rec.prompt_batch([[1, 20]])


def test_recommender_save_load_round_trip_gives_the_same_beams(tmp_path):
    bb = scratch(dropout=0.3)
    codes = random_codes()
    rec = GenerativeRecommender(bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, 5)
    bb.model.train()  # recommend switches dropout off by itself and restores the mode
    before = rec.recommend([[1, 2, 3], [4]], num_beams=6, k=4)
    assert bb.model.training
    assert before.items.shape == (2, 4) and (before.items >= 0).all()
    assert all(len(set(row.tolist())) == 4 for row in before.items)
    rec.save(tmp_path / "model")
    loaded = GenerativeRecommender.load(tmp_path / "model", device="cpu")
    after = loaded.recommend([[1, 2, 3], [4]], num_beams=6, k=4)
    assert torch.equal(before.items, after.items)
    torch.testing.assert_close(before.scores, after.scores, atol=1e-5, rtol=0)
    assert loaded.fmt == rec.fmt and loaded.vocab.offsets == rec.vocab.offsets and loaded.max_history == 5
