"""Trie-constrained beam search and sampling against brute-force scoring and HF generate.

A tiny random Qwen2 with 20 text tokens and 3 SID levels of 16 codes (token ids 20..67);
100 items with random unique codes, so every item's full-sequence log-prob can be computed
by teacher forcing and the exact top-K known.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genrec.decode.beam import constrained_beam_search, constrained_sample  # noqa: E402
from genrec.sid.trie import SIDTrie  # noqa: E402

NUM_TEXT, CODEBOOK, LEVELS, NUM_ITEMS = 20, 16, 3, 100
OFFSETS = [NUM_TEXT + t * CODEBOOK for t in range(LEVELS)]
VOCAB = NUM_TEXT + LEVELS * CODEBOOK
PAD, EOS = 0, 1  # text tokens that are never allowed inside a SID


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(cls, **kw):
    # A large initializer_range makes the next-token distributions peaked, so the ranking has
    # no near-ties that float rounding could swap between two correct implementations.
    return cls(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
        **kw,
    )


def make_model(kind: str = "qwen2", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(tiny_config(transformers.Qwen2Config))
    else:
        model = transformers.LlamaForCausalLM(tiny_config(transformers.LlamaConfig))
    return model.eval()


def make_codes(num_items: int = NUM_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = rng.choice(CODEBOOK**LEVELS, size=num_items, replace=False)
    return np.stack([flat // CODEBOOK**2, flat // CODEBOOK % CODEBOOK, flat % CODEBOOK], axis=1)  # (N, L)


def make_trie(codes: np.ndarray) -> SIDTrie:
    return SIDTrie(torch.as_tensor(codes), codebook_sizes=[CODEBOOK] * LEVELS)


def make_prompts(lengths=(5, 9, 12, 7), seed: int = 0):
    """Left-padded prompts of text tokens (never PAD or EOS)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, width - n :] = torch.randint(2, NUM_TEXT, (n,), generator=g)
        attention_mask[b, width - n :] = 1
    return input_ids, attention_mask


def brute_force_scores(model, input_ids, attention_mask, codes: np.ndarray) -> torch.Tensor:
    """(B, N) full-sequence log-prob of every item, by teacher forcing each unpadded prompt + SID."""
    sid_tokens = torch.as_tensor(codes) + torch.tensor(OFFSETS)  # (N, L)
    rows = []
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            prompt = input_ids[b][attention_mask[b].bool()]  # (T_b,)
            seq = torch.cat([prompt.expand(len(codes), -1), sid_tokens], dim=1)  # (N, T_b + L)
            log_probs = torch.log_softmax(model(input_ids=seq).logits.float(), dim=-1)  # (N, T_b + L, V)
            n = prompt.shape[0]
            # The token at position n + t is predicted by the logits at position n + t - 1.
            token_lp = log_probs[:, n - 1 : n - 1 + LEVELS].gather(2, sid_tokens.unsqueeze(-1)).squeeze(-1)
            rows.append(token_lp.sum(1))
    return torch.stack(rows)


def assert_valid_and_distinct(out, trie):
    live = out.items >= 0
    assert bool(live.any())
    looked_up = trie.lookup(out.codes[live])
    assert torch.equal(looked_up, out.items[live]), "a returned SID is not the returned item's SID"
    assert torch.equal(out.token_ids[live], out.codes[live] + torch.tensor(OFFSETS))
    for row in out.items.tolist():
        valid = [i for i in row if i >= 0]
        assert len(valid) == len(set(valid)), f"duplicate items in {row}"


def test_beam_search_equals_brute_force_when_beams_cover_all_items():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    out = constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=128, num_return=20)

    assert out.items.shape == (4, 20) and out.codes.shape == (4, 20, LEVELS)
    assert_valid_and_distinct(out, trie)
    exact = brute_force_scores(model, input_ids, attention_mask, codes)  # (B, N)
    top_scores, top_items = exact.topk(20, dim=1)
    assert out.items.tolist() == top_items.tolist()
    torch.testing.assert_close(out.scores, top_scores, atol=1e-4, rtol=0)


def test_beam_search_equals_hf_generate_on_left_padded_batch():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    num_beams = 20  # > the 16 level-0 codes: some beams are dead after the first step

    allowed = {}  # generated SID token prefix -> allowed next token ids
    for sid in (codes + np.array(OFFSETS)).tolist():
        for t in range(LEVELS):
            allowed.setdefault(tuple(sid[:t]), set()).add(sid[t])
    width = input_ids.shape[1]
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        prefix_allowed_tokens_fn=lambda _, seq: sorted(allowed[tuple(seq[width:].tolist())]),
        max_new_tokens=LEVELS,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        return_dict_in_generate=True,
        output_scores=True,
    )
    hf_codes = (generated.sequences[:, width:] - torch.tensor(OFFSETS)).view(4, num_beams, LEVELS)
    hf_items = trie.lookup(hf_codes.reshape(-1, LEVELS)).view(4, num_beams)
    hf_scores = generated.sequences_scores.view(4, num_beams)

    out = constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=num_beams)
    assert_valid_and_distinct(out, trie)
    assert (out.items >= 0).all()
    assert out.items.tolist() == hf_items.tolist()
    torch.testing.assert_close(out.scores, hf_scores, atol=1e-4, rtol=0)


def test_prompt_is_encoded_once_and_its_cache_shared_by_the_beams():
    model, codes = make_model(), make_codes()
    input_ids, attention_mask = make_prompts()
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, res: shapes.append(tuple(args[0].shape)))
    try:
        constrained_beam_search(model, input_ids, attention_mask, make_trie(codes), OFFSETS, num_beams=8)
    finally:
        hook.remove()
    # The prompt batch once; then the 8 beams' tokens as 8 query positions of each prompt's row.
    assert shapes == [(4, 12), (4, 8), (4, 8)]


@pytest.mark.parametrize("wrap", ["llama", "eager", "peft"])
def test_llama_eager_and_peft_models_match_brute_force(wrap):
    codes = make_codes()
    if wrap == "llama":
        model = make_model("llama")
    elif wrap == "eager":
        model = make_model()
        model.set_attn_implementation("eager")
    else:
        peft = pytest.importorskip("peft")
        torch.manual_seed(1)
        # init_lora_weights=False makes the adapter change the outputs, so a PEFT forward that
        # bypassed the adapter would disagree with the brute force through the same wrapper.
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(make_model(), lora).eval()
    input_ids, attention_mask = make_prompts()
    out = constrained_beam_search(model, input_ids, attention_mask, make_trie(codes), OFFSETS, num_beams=100)
    exact = brute_force_scores(model, input_ids, attention_mask, codes)
    top_scores, top_items = exact.topk(100, dim=1)
    assert out.items.tolist() == top_items.tolist()
    torch.testing.assert_close(out.scores, top_scores, atol=1e-4, rtol=0)


def test_the_kv_cache_goes_by_the_argument_name_of_the_models_forward():
    """transformers 5.x calls it ``cache`` (``past_key_values`` warns, then goes); older ones ``past_key_values``."""
    import inspect

    from genrec.model.backbone import cache_kwargs, output_cache

    model, codes = make_model(), make_codes()
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert list(cache_kwargs(model, None)) == [expected]

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return SimpleNamespace(past_key_values=past_key_values)

    class Wrapped(torch.nn.Module):  # DDP keeps the model as .module
        def __init__(self):
            super().__init__()
            self.module = Older()

    assert cache_kwargs(Wrapped(), "kv") == {"past_key_values": "kv"}
    assert output_cache(SimpleNamespace(past_key_values="kv")) == "kv"
    assert output_cache(SimpleNamespace(cache="kv2", past_key_values=None)) == "kv2"
    input_ids, attention_mask = make_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated argument name would raise here
        out = constrained_beam_search(model, input_ids, attention_mask, make_trie(codes), OFFSETS, num_beams=8)
    assert (out.items >= 0).all()


def test_fewer_items_than_requested_pads_with_minus_one():
    model, codes = make_model(), make_codes(num_items=5)
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    out = constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=10)
    assert (out.items[:, :5] >= 0).all() and (out.items[:, 5:] == -1).all()
    assert torch.isinf(out.scores[:, 5:]).all() and (out.codes[:, 5:] == -1).all()
    assert sorted(out.items[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert_valid_and_distinct(out, trie)


def test_empty_allowed_set_raises():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    corrupt = copy.deepcopy(trie)
    corrupt.transitions[1][0].fill_(-1)  # a level-1 node that the root leads to loses its children
    with pytest.raises(RuntimeError, match="allows no code at level 1"):
        constrained_beam_search(model, input_ids, attention_mask, corrupt, OFFSETS, num_beams=128)
    with pytest.raises(RuntimeError, match="allows no code at level 1"):
        constrained_sample(model, input_ids, attention_mask, corrupt, OFFSETS, num_samples=200)
    # The untouched trie decodes the same inputs.
    constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=128)


def test_bad_inputs_are_rejected():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    with pytest.raises(ValueError, match="LEFT-padded"):
        constrained_beam_search(model, input_ids, attention_mask.flip(1), trie, OFFSETS)
    with pytest.raises(ValueError, match="outside the model's"):
        constrained_beam_search(model, input_ids, attention_mask, trie, [NUM_TEXT, NUM_TEXT + 16, VOCAB - 8])
    with pytest.raises(ValueError, match="num_return"):
        constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=4, num_return=5)


def test_sampling_is_valid_reproducible_and_scored_like_teacher_forcing():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()

    def sample(seed, temperature=1.0):
        gen = torch.Generator().manual_seed(seed)
        return constrained_sample(model, input_ids, attention_mask, trie, OFFSETS, 16, temperature, generator=gen)

    out = sample(0)
    assert out.items.shape == (4, 16) and (out.items >= 0).all()
    assert torch.equal(trie.lookup(out.codes.view(-1, LEVELS)), out.items.view(-1))
    again, other = sample(0), sample(1)
    assert torch.equal(out.items, again.items) and torch.equal(out.scores, again.scores)
    assert not torch.equal(out.items, other.items)
    exact = brute_force_scores(model, input_ids, attention_mask, codes)  # (B, N)
    torch.testing.assert_close(out.scores, exact.gather(1, out.items), atol=1e-4, rtol=0)
    # A near-zero temperature always takes each level's most likely allowed code.
    cold = sample(2, temperature=1e-4)
    assert (cold.items == cold.items[:, :1]).all()


def test_sampling_follows_the_restricted_distribution():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    # 200 copies of one prompt x 20 samples: attention per step grows with samples squared.
    input_ids, attention_mask = make_prompts(lengths=(6,))
    input_ids, attention_mask = input_ids.expand(200, -1), attention_mask.expand(200, -1)
    gen = torch.Generator().manual_seed(0)
    out = constrained_sample(model, input_ids, attention_mask, trie, OFFSETS, 20, temperature=2.0, generator=gen)

    # The level-0 law: softmax(logits / T) over the codes the root allows.
    with torch.no_grad():
        logits = model(input_ids=input_ids[:1]).logits[0, -1, OFFSETS[0] : OFFSETS[0] + CODEBOOK]
    allowed = trie.transitions[0][0] >= 0
    expected = torch.softmax((logits / 2.0).masked_fill(~allowed, float("-inf")), dim=0)
    observed = torch.bincount(out.codes[:, :, 0].reshape(-1), minlength=CODEBOOK).float() / 4000
    assert observed[~allowed].sum() == 0
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_attention_without_custom_masks_is_rejected():
    model, codes = make_model(), make_codes()
    input_ids, attention_mask = make_prompts()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        constrained_beam_search(model, input_ids, attention_mask, make_trie(codes), OFFSETS)
    torch.manual_seed(0)
    sliding = transformers.Qwen2ForCausalLM(
        tiny_config(transformers.Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    ).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        constrained_beam_search(sliding, input_ids, attention_mask, make_trie(codes), OFFSETS)
