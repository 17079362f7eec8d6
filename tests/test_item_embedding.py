"""Item-ID input embeddings: where the vectors go, no target leak, decoding, save/load, deepcopy, SFT."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genrec.model import item_embedding  # noqa: E402
from genrec.model.item_embedding import ItemEmbedding, attach  # noqa: E402
from genrec.model.recommender import GenerativeRecommender  # noqa: E402
from genrec.sid.trie import SIDTrie  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_model import SIZES, random_codes, scratch  # noqa: E402

NUM_ITEMS = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recommender_with_items(init_std: float = 1.0, max_history: int = 5, **kw) -> GenerativeRecommender:
    """A scratch recommender over 20 items whose item vectors are large enough to move every beam."""
    bb = scratch()
    codes = random_codes(NUM_ITEMS)
    vocab_size = bb.model.get_input_embeddings().weight.shape[0]
    hidden = bb.model.config.hidden_size
    attach(bb.model, ItemEmbedding(bb.vocab.sid_to_ids(codes), vocab_size, hidden, init_std, **kw))
    bb.model.eval()
    return GenerativeRecommender(bb.model, bb.tokenizer, bb.vocab, SIDTrie(codes, SIZES), codes, bb.fmt, max_history)


def test_vectors_go_to_the_last_token_of_each_complete_sid_only():
    rec = recommender_with_items()
    items = item_embedding.find(rec.model)
    ids, _ = rec.prompt_batch([[4, 5, 6], [7]])
    index = items.item_index(ids)
    head = len(rec.fmt.head("seqrec"))
    assert index[0].tolist() == [0] * head + [0, 0, 5, 0, 0, 6, 0, 0, 7]
    assert index[1].tolist() == [0] * 6 + [0] * head + [0, 0, 8]  # left padding and head: no item
    # A SID cut at the start of the input, or a one-token decoding step, holds no complete item.
    assert items.item_index(ids[:, head + 1 :])[0].tolist() == [0, 0, 0, 0, 6, 0, 0, 7]
    assert items.item_index(ids[:, -1:]).tolist() == [[0], [0]]
    # A code path that is not an item's SID gets no vector.
    sid = rec.sid_ids
    unused = next(
        [a, b, c]
        for a in range(SIZES[0])
        for b in range(SIZES[1])
        for c in range(SIZES[2])
        if not (rec.codes == [a, b, c]).all(axis=1).any()
    )
    fake = torch.as_tensor(rec.vocab.sid_to_ids(np.array([unused]))[0])
    assert items.item_index(torch.cat([torch.as_tensor(sid[3]), fake])[None]).tolist() == [[0, 0, 4, 0, 0, 0]]


def test_no_sid_token_sees_the_vector_of_its_own_item():
    rec = recommender_with_items()
    items = item_embedding.find(rec.model)
    ids, _ = rec.prompt_batch([[1, 2, 3]])  # head, then 3 items of 3 tokens; item 3 plays the target

    def logits():
        with torch.no_grad():
            return rec.model(input_ids=ids).logits[0]  # (T, V)

    before = logits()
    with torch.no_grad():
        items.table.weight[3 + 1].add_(5.0)  # the target's own row
    # Every position that predicts one of the target's tokens is unchanged; only its last token, which
    # predicts what follows the item, reads the row.
    torch.testing.assert_close(logits()[:-1], before[:-1], atol=0, rtol=0)
    assert not torch.allclose(logits()[-1], before[-1])
    with torch.no_grad():
        items.table.weight[1 + 1].add_(5.0)  # a history item's row moves the target's predictions
    assert not torch.allclose(logits()[-4:-1], before[-4:-1])


@pytest.mark.parametrize("states", [False, True])
def test_beam_search_with_item_vectors_equals_teacher_forcing(states):
    if states:
        vectors = np.random.default_rng(0).normal(size=(NUM_ITEMS, 8))
        rec = recommender_with_items(pretrained=vectors, encoder=sasrec_encoder())
    else:
        rec = recommender_with_items()
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    out = rec.recommend(histories, num_beams=NUM_ITEMS, k=NUM_ITEMS)
    assert (out.items >= 0).all() and all(len(set(r.tolist())) == NUM_ITEMS for r in out.items)
    levels = rec.vocab.num_levels
    for b, history in enumerate(histories):
        prompt = torch.as_tensor(rec.prompt_ids(history))
        seqs = torch.cat([prompt.expand(NUM_ITEMS, -1), torch.as_tensor(rec.sid_ids)], dim=1)  # (N, T + L)
        with torch.no_grad():
            log_probs = torch.log_softmax(rec.model(input_ids=seqs).logits.float(), dim=-1)
        n = len(prompt)
        exact = log_probs[:, n - 1 : n - 1 + levels].gather(2, seqs[:, n:, None]).squeeze(-1).sum(1)  # (N,)
        torch.testing.assert_close(out.scores[b], exact[out.items[b]], atol=1e-4, rtol=0)
        assert out.items[b].tolist() == exact.argsort(descending=True).tolist()
    # ... and the history's vectors are in those scores: without them the ranking moves.
    with torch.no_grad():
        item_embedding.find(rec.model).table.weight.zero_()
        if states:
            item_embedding.find(rec.model).state_proj.weight.zero_()
    plain = rec.recommend(histories, num_beams=NUM_ITEMS, k=NUM_ITEMS)
    assert not torch.allclose(plain.scores, out.scores, atol=1e-3)


def sasrec_encoder(max_len: int = 4):
    from genrec.baselines.sasrec import SASRec

    torch.manual_seed(0)
    return SASRec(NUM_ITEMS, max_len=max_len, hidden_size=8, num_layers=1, num_heads=2)


def test_sasrec_states_are_sasrecs_own_and_see_no_later_item():
    vectors = np.random.default_rng(0).normal(size=(NUM_ITEMS, 8))
    rec = recommender_with_items(pretrained=vectors, encoder=sasrec_encoder(max_len=4))
    items = item_embedding.find(rec.model)
    items.train()
    assert not items.encoder.training and not any(p.requires_grad for p in items.encoder.parameters())
    ids, _ = rec.prompt_batch([[1, 2, 3, 4, 5], [6, 7]])  # 5 items: more than SASRec's window of 4
    index = items.item_index(ids)
    states = items.states(index)  # (B, T, 8)
    at = index > 0
    # At each item, SASRec's representation of the history that ends there (its last 4 items).
    for b, history in enumerate([[1, 2, 3, 4, 5], [6, 7]]):
        expected = items.encoder.encode([np.array(history[: k + 1]) for k in range(len(history))])
        torch.testing.assert_close(states[b][at[b]], expected)
    assert (states[~at] == 0).all()
    # Appending items never moves an earlier state: teacher forcing sees what the prompt sees.
    longer = torch.cat([ids, torch.as_tensor(rec.sid_ids[[9, 11]])], dim=1)  # a target after each history
    torch.testing.assert_close(items.states(items.item_index(longer))[:, : ids.shape[1]], states)
    with pytest.raises(ValueError, match="SASRec encoder has 20 items, the SIDs 19"):
        ItemEmbedding(rec.sid_ids[:-1], len(rec.tokenizer), 8, pretrained=vectors[:-1], encoder=sasrec_encoder())


@pytest.mark.parametrize("kind", ["learned", "sasrec", "sasrec_states"])
def test_save_load_keeps_the_table_beside_a_plain_checkpoint(tmp_path, kind):
    from safetensors.torch import load_file

    vectors = None if kind == "learned" else np.random.default_rng(0).normal(size=(NUM_ITEMS, 8))
    encoder = sasrec_encoder() if kind == "sasrec_states" else None
    rec = recommender_with_items(pretrained=vectors, encoder=encoder)
    before = rec.recommend([[1, 2, 3], [4]], num_beams=8, k=5)
    rec.save(tmp_path / "model")
    assert (tmp_path / "model" / item_embedding.FILENAME).is_file()
    assert not any(item_embedding.ATTRIBUTE in k for k in load_file(tmp_path / "model" / "model.safetensors"))
    assert item_embedding.find(rec.model) is not None  # saving puts the table back
    loaded = GenerativeRecommender.load(tmp_path / "model", device="cpu")
    after = loaded.recommend([[1, 2, 3], [4]], num_beams=8, k=5)
    assert torch.equal(before.items, after.items)
    torch.testing.assert_close(before.scores, after.scores, atol=1e-5, rtol=0)
    # The table only fits the SIDs it was built for.
    other = random_codes(NUM_ITEMS, seed=1)
    with pytest.raises(ValueError, match="built for other SIDs"):
        GenerativeRecommender(loaded.model, loaded.tokenizer, loaded.vocab, SIDTrie(other, SIZES), other, loaded.fmt, 5)


def test_deepcopy_holds_its_own_table():
    rec = recommender_with_items()
    reference = copy.deepcopy(rec.model)
    ids, _ = rec.prompt_batch([[1, 2, 3]])
    with torch.no_grad():
        frozen = reference(input_ids=ids).logits
        item_embedding.find(rec.model).table.weight.add_(1.0)
        assert not torch.allclose(rec.model(input_ids=ids).logits, frozen)
        torch.testing.assert_close(reference(input_ids=ids).logits, frozen, atol=0, rtol=0)


def test_items_sharing_a_sid_are_refused():
    with pytest.raises(ValueError, match="two items share a SID"):
        ItemEmbedding(np.array([[5, 7], [5, 7]]), vocab_size=10, hidden_size=4)


@pytest.mark.parametrize("backbone", ["scratch", "lora"])
def test_sft_trains_the_table_and_saves_it(tiny_dataset, tmp_path, backbone):
    from genrec.train.sft import train_sft
    from test_model import save_tiny_pretrained
    from test_sft import config, tiny_inputs

    overrides = ["model.item_embedding=learned", "sft.max_epochs=1", "sft.tasks={seqrec: 1.0}"]
    if backbone == "lora":
        save_tiny_pretrained(tmp_path / "base", tied=False)
        overrides += [f"model.backbone={tmp_path / 'base'}", "model.lora_r=4", "sft.lr=0.005"]
    codes, texts = tiny_inputs(tiny_dataset)
    cfg = config(*overrides)
    summary = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "out", tmp_path / "work")
    hidden = 32
    rec = GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")
    table = item_embedding.find(rec.model).table.weight  # (N + 1, H)
    assert table.shape == (tiny_dataset.num_items + 1, hidden) and (table[0] == 0).all()
    without = train_sft(
        config(*overrides[1:]), tiny_dataset, codes, texts, tmp_path / "out_plain", tmp_path / "work_plain"
    )
    assert summary["params"]["trainable"] - without["params"]["trainable"] == table.numel()
    assert not (tmp_path / "out_plain" / "model" / item_embedding.FILENAME).exists()
    assert rec.recommend([[1, 2, 3]], num_beams=5, k=5).items.shape == (1, 5)


def test_the_seqrec_loss_trains_the_rows_of_history_items():
    from genrec.train.sft import NextTokenLoss

    rec = recommender_with_items(init_std=0.02)
    ids, mask = rec.prompt_batch([[1, 2, 3]])
    head = len(rec.fmt.head("seqrec"))
    labels = ids.clone()
    labels[:, : head + 3] = -100  # seqrec: every item after the first is a target
    NextTokenLoss(rec.model)(ids, mask, labels).backward()
    grad = item_embedding.find(rec.model).table.weight.grad  # (N + 1, H)
    nonzero = sorted(int(r) for r in grad.abs().sum(1).nonzero())
    # Items 1 and 2 precede a target; item 3 is the last target, so nothing reads its vector.
    assert nonzero == [1 + 1, 2 + 1]


def test_sasrec_vectors_stay_frozen_and_only_their_projection_trains():
    vectors = np.random.default_rng(0).normal(size=(NUM_ITEMS, 6))
    rec = recommender_with_items(init_std=0.02, pretrained=vectors)
    items = item_embedding.find(rec.model)
    assert not items.table.weight.requires_grad and items.proj.weight.shape == (rec.model.config.hidden_size, 6)
    torch.testing.assert_close(items.table.weight[1:], torch.as_tensor(vectors, dtype=torch.float32))
    ids, _ = rec.prompt_batch([[1, 2, 3]])
    rec.model(input_ids=ids).logits.sum().backward()
    assert items.proj.weight.grad is not None and items.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 pretrained item vectors for 20 items"):
        ItemEmbedding(rec.sid_ids, len(rec.tokenizer), 8, pretrained=vectors[:3])


def test_item_dropout_drops_whole_vectors_in_training_only():
    rec = recommender_with_items(dropout=0.5)
    items = item_embedding.find(rec.model)
    ids = torch.as_tensor(rec.sid_ids.reshape(1, -1)).repeat(50, 1)  # every item, 50 times
    index = items.item_index(ids)
    items.eval()
    torch.testing.assert_close(items(ids), items.table(index))
    items.train()
    torch.manual_seed(0)
    out = items(ids)  # (50, T, H)
    at_items = index > 0
    kept = out[at_items].abs().sum(-1) > 0
    assert 0.4 < kept.float().mean() < 0.6  # each occurrence kept with probability 1 - 0.5
    torch.testing.assert_close(out[at_items][kept], items.table(index)[at_items][kept])  # kept ones unscaled
    with pytest.raises(ValueError, match="item dropout"):
        ItemEmbedding(rec.sid_ids, len(rec.tokenizer), 8, dropout=1.0)


def test_config_names_the_bad_value():
    from genrec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.item_embedding must be one of none, learned, sasrec, sasrec_states"):
        load_config(None, ["run_dir=x", "model.item_embedding=ids"])
    with pytest.raises(ConfigError, match="model.item_dropout"):
        load_config(None, ["run_dir=x", "model.item_dropout=1.5"])
    with pytest.raises(ConfigError, match="seqrec recommender only; set it to none for the stage gream_sft"):
        load_config(None, ["run_dir=x", "model.item_embedding=sasrec", "stages=[sft, gream_sft]"])


def test_sft_on_sasrec_vectors_without_sasrec_is_a_clear_error(tiny_dataset, tmp_path):
    from genrec.config import ConfigError
    from genrec.train.sft import train_sft
    from test_sft import config, tiny_inputs

    codes, texts = tiny_inputs(tiny_dataset)
    with pytest.raises(ConfigError, match="item_embedding: sasrec needs the run's SASRec"):
        train_sft(config("model.item_embedding=sasrec"), tiny_dataset, codes, texts, tmp_path / "o", tmp_path / "w")


@pytest.mark.parametrize("kind", ["sasrec", "sasrec_states"])
def test_sft_on_sasrec_vectors_reads_them_and_resumes_only_under_the_same_sasrec(tiny_dataset, tmp_path, kind):
    from genrec.baselines.sasrec import SASRec
    from genrec.train.sft import _fingerprint, train_sft
    from test_sft import config, tiny_inputs

    codes, texts = tiny_inputs(tiny_dataset)
    cfg = config(f"model.item_embedding={kind}", "sft.max_epochs=1", "sft.tasks={seqrec: 1.0}")
    torch.manual_seed(0)
    sasrec = SASRec(tiny_dataset.num_items, max_len=5, hidden_size=8).eval()
    summary = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "out", tmp_path / "work", teacher=sasrec)
    rec = GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")
    items = item_embedding.find(rec.model)
    # The SASRec rows without its padding row, unchanged; only the 8 -> 32 projection trained.
    torch.testing.assert_close(items.table.weight[1:], sasrec.item_emb.weight[1:].detach())
    assert items.proj.weight.shape == (32, 8)
    frozen = items.table.weight.numel()
    if kind == "sasrec_states":  # SASRec itself, frozen, whose state after each item enters through 8 -> 32
        assert items.state_proj.weight.shape == (32, 8) and items.state_proj.weight.requires_grad
        frozen += sum(p.numel() for p in sasrec.parameters())
        for name, tensor in sasrec.state_dict().items():
            torch.testing.assert_close(items.encoder.state_dict()[name], tensor)
        ids, _ = rec.prompt_batch([[1, 2, 3]])
        index = items.item_index(ids)
        torch.testing.assert_close(items.states(index)[index > 0][-1], sasrec.encode([np.array([1, 2, 3])])[0])
    else:
        assert items.encoder is None
    assert summary["params"]["total"] - summary["params"]["trainable"] == frozen
    # A checkpoint made under one SASRec is not resumed under another.
    args = (cfg, tiny_dataset, codes, texts, ["seqrec"])
    other = SASRec(tiny_dataset.num_items, max_len=5, hidden_size=8)
    assert _fingerprint(*args, sasrec) == _fingerprint(*args, sasrec) != _fingerprint(*args, other)
