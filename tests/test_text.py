"""Item text composition and the text encoders (MiniLM from the wheel, HF mean pooling, a tiny causal LM), with the cache."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.text.compose import compose_text, compose_texts, parse_template
from genrec.text.encode import EmbeddingCache, TextEncoder, check_embeddings, embed_texts, minilm_dir

torch.set_num_threads(1)


def items_frame(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    base = {"item_id": np.arange(n), "raw_id": [f"r{i}" for i in range(n)]}
    return pd.DataFrame({**base, **columns})


def test_empty_fields_drop_with_their_labels():
    parts = parse_template("{title}. Brand: {brand}. Categories: {categories}.")
    row = {"title": "Red Lipstick.", "brand": "", "categories": "Beauty, Makeup"}
    assert compose_text(row, parts, 512) == "Red Lipstick. Categories: Beauty, Makeup."
    # A missing first field leaves no dangling separator.
    assert compose_text({"title": "", "brand": "OPI", "categories": None}, parts, 512) == "Brand: OPI."
    assert compose_text({"title": " ", "brand": float("nan")}, parts, 512) == ""


def test_default_template_and_interests_column():
    items = items_frame(
        title=["Nail polish", "Drill"],
        brand=["OPI", ""],
        categories=["Beauty, Nails", "Tools"],
        description=["", "Cordless,\n18V"],
        interests=[["glossy finish", "gift"], []],
    )
    texts, fallback = compose_texts(items)
    assert texts == [
        "Nail polish. Brand: OPI. Categories: Beauty, Nails. Interests: glossy finish; gift.",
        "Drill. Categories: Tools. Cordless, 18V.",
    ]
    assert fallback == []
    # Without an interests column the default template still works (the field reads as empty).
    assert (
        compose_texts(items.drop(columns=["interests"]))[0][0] == "Nail polish. Brand: OPI. Categories: Beauty, Nails."
    )


def test_empty_text_falls_back_to_raw_id_and_is_reported():
    items = items_frame(title=["A thing", ""], brand=["", ""], categories=["", ""], description=["", ""])
    texts, fallback = compose_texts(items, "title")
    assert texts == ["A thing", "r1"] and fallback == [1]
    with pytest.raises(ValueError, match="every item text is empty"):
        compose_texts(items.assign(title=["", ""]), "title")


def test_max_chars_cuts_on_a_word_boundary():
    items = items_frame(title=["alpha beta gamma delta epsilon"])
    assert compose_texts(items, "title", max_chars=18)[0] == ["alpha beta gamma"]


def test_bad_templates_and_items_are_errors():
    items = items_frame(title=["a", "b"])
    with pytest.raises(ValueError, match="field 'colour'.*fix text.template"):
        compose_texts(items, "{title} {colour}")
    with pytest.raises(ValueError, match="must name item fields"):
        compose_texts(items, "no fields here")
    with pytest.raises(ValueError, match="not a valid format string"):
        compose_texts(items, "{title")
    with pytest.raises(ValueError, match="item_id 0 more than once"):
        compose_texts(pd.concat([items, items.iloc[:1]]), "title")


@pytest.mark.shared_data
def test_beauty_texts_have_no_empty_item():
    from conftest import shared_data_or_skip

    path = shared_data_or_skip("amazon-beauty-2014-5core") / "Beauty.item.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    items = pd.DataFrame(
        [
            {
                "item_id": int(k),
                "raw_id": v["asin"],
                **{f: v[f] for f in ("title", "brand", "categories", "description")},
            }
            for k, v in raw.items()
        ]
    ).sort_values("item_id")
    texts, fallback = compose_texts(items)
    assert len(texts) == 12101 and fallback == []  # the 7 items without a title still have categories
    no_title = items.index[items["title"] == ""][0]
    assert texts[no_title].startswith("Brand:") or texts[no_title].startswith("Categories:")


# --------------------------------------------------------------------------- encoders

SENTENCES = [
    "Red matte lipstick, long lasting",
    "Long-lasting lip colour in matte red",
    "Cordless power drill with two batteries",
    "Moisturising face cream for dry skin",
    "Hydrating facial moisturiser",
    "Stainless steel lab tweezers",
    "Nail polish, glossy pink",
    "Shampoo for curly hair",
    "Digital multimeter with probes",
    "Eye shadow palette, 12 colours",
]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm", device="cpu")


def test_minilm_loads_offline_and_embeds_by_meaning(minilm):
    emb = minilm.encode(SENTENCES)
    assert emb.shape == (10, 384) and minilm.dim == 384 and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # two lipsticks vs lipstick and drill
    assert sim[3, 4] > sim[3, 5] + 0.3


def test_hf_mean_pooling_equals_sentence_transformers(minilm):
    # The MiniLM directory is also a plain HF BERT checkpoint: mean pooling + L2 norm is exactly its ST pipeline.
    hf = TextEncoder(f"hf:{minilm_dir()}", device="cpu")
    a = hf.encode(SENTENCES)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(a, minilm.encode(SENTENCES), atol=1e-5)
    assert hf.fingerprint != minilm.fingerprint  # different pooling path, separate cache


def tiny_causal_lm(path):
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer trained on SENTENCES (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)


def test_causal_lm_mean_pooling_ignores_padding(tmp_path):
    tiny_causal_lm(tmp_path)
    enc = TextEncoder(f"lm:{tmp_path}", device="cpu")
    assert enc.dim == 32 and enc.tokenizer.pad_token == "<|endoftext|>"  # no pad token: eos pads
    batch = enc.encode(SENTENCES)
    alone = np.concatenate([enc.encode([s]) for s in SENTENCES])
    assert batch.shape == (10, 32)
    np.testing.assert_allclose(batch, alone, atol=1e-5)  # padded positions do not enter the mean
    assert not np.allclose(batch[0], batch[2])


def test_cache_reembeds_only_changed_texts(minilm, tmp_path):
    texts = SENTENCES[:6] + [SENTENCES[0]]  # a repeated text is embedded once
    emb, stats = embed_texts(texts, minilm, batch_size=4, cache_dir=tmp_path)
    assert stats["n_computed"] == 6 and stats["n_cached"] == 0
    np.testing.assert_array_equal(emb[0], emb[6])
    changed = ["Blue nail varnish"] + texts[1:]
    emb2, stats2 = embed_texts(changed, minilm, batch_size=4, cache_dir=tmp_path)
    assert stats2["n_computed"] == 1 and stats2["n_cached"] == 6
    np.testing.assert_array_equal(emb2[1:6], emb[1:6])
    np.testing.assert_allclose(emb2[0], minilm.encode(["Blue nail varnish"])[0], atol=1e-6)
    assert len(list((tmp_path / minilm.fingerprint).glob("shard-*.npz"))) == 2
    assert set(EmbeddingCache(tmp_path, minilm.fingerprint).get([EmbeddingCache.key("Blue nail varnish")])) == {
        EmbeddingCache.key("Blue nail varnish")
    }


def test_bad_texts_and_embeddings_are_errors(minilm, tmp_path):
    with pytest.raises(ValueError, match="text of item 1 is empty"):
        embed_texts(["a", " "], minilm)
    with pytest.raises(ValueError, match="NaN or infinite values, e.g. item 1"):
        check_embeddings(np.array([[1.0, 0.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="zero norm, e.g. item 0"):
        check_embeddings(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="use minilm, st:<dir>"):
        TextEncoder("bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TextEncoder(f"st:{tmp_path / 'nowhere'}")


def test_text_and_embed_stages_write_their_files(tmp_path, capsys):
    from genrec.config import RunConfig
    from genrec.io import read_json
    from genrec.pipeline import STAGES, StageContext
    from genrec.text import compose, encode

    run_dir = tmp_path / "run"
    (run_dir / "prepare").mkdir(parents=True)
    (run_dir / "prepare" / "done.json").write_text("{}")
    items = items_frame(
        title=SENTENCES[:4] + [""], brand=[""] * 5, categories=["Shop, A"] * 4 + [""], description=[""] * 5
    )
    items.to_parquet(run_dir / "prepare" / "items.parquet")
    cfg = RunConfig(run_dir=str(run_dir))
    cfg.embed.cache_dir = str(tmp_path / "cache")

    def ctx(name, attempt=0):
        out = tmp_path / f"out-{name}-{attempt}"
        out.mkdir()
        return StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES[name], out=out, work=tmp_path / "work")

    text_ctx = ctx("text")
    summary = compose.run(text_ctx)
    assert summary["n_items"] == 5 and summary["n_empty"] == 1 and summary["empty_item_ids"] == [4]
    text_ctx.out.rename(run_dir / "text")
    (run_dir / "text" / "done.json").write_text("{}")
    assert pd.read_parquet(run_dir / "text" / "items_text.parquet")["text"].tolist()[4] == "r4"

    embed_ctx = ctx("embed")
    summary = encode.run(embed_ctx)
    emb = np.load(embed_ctx.out / "item_emb.npy")
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    info = read_json(embed_ctx.out / "encoder.json")
    assert info["dim"] == 384 and info["n_computed"] == 5 and summary["name"] == "minilm"
    assert "items/s" in capsys.readouterr().out
    # A second run embeds nothing: every text is in the shared cache.
    assert encode.run(ctx("embed", attempt=1))["n_cached"] == 5
