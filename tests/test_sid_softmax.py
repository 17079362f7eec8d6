"""The trie SID softmax (``sft.sid_softmax: trie``): prefix nodes, the loss, decoding and the saved model.

Every quantity is checked against a brute-force definition: a token's log-probability is its
logit minus the logsumexp of the logits of the codes the trie allows after its SID prefix.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from genrec.decode.beam import constrained_beam_search, constrained_sample  # noqa: E402
from genrec.model.sid_softmax import TrieSoftmax, level_log_probs  # noqa: E402
from genrec.model.vocab import SIDVocab  # noqa: E402
from genrec.sid.trie import SIDTrie  # noqa: E402
from test_beam import LEVELS, OFFSETS, make_codes, make_model, make_prompts, make_trie  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 5 text tokens, then level 0 (2 codes: ids 5, 6) and level 1 (3 codes: ids 7, 8, 9).
SMALL_CODES = np.array([[0, 1], [0, 2], [1, 0]])
SMALL_VOCAB = SIDVocab([2, 3], [5, 7])


def small_softmax() -> TrieSoftmax:
    return TrieSoftmax(SIDTrie(SMALL_CODES, [2, 3]), SMALL_VOCAB, vocab_size=10)


def test_prefix_nodes_follow_each_sid_through_the_trie():
    #        text a0 b1 a1 b0 text b2 a1 b1
    ids = [2, 5, 8, 6, 7, 3, 9, 6, 8]
    nodes = small_softmax().prefix_nodes(torch.tensor([ids]))
    # a level-1 token reads the node of its level-0 predecessor: prefix (0) is node 0, (1) node 1;
    # b2 after a text token continues no prefix (-1); b1 after a1 has a valid node that does not allow it.
    assert nodes.tolist() == [[0, 0, 0, 0, 1, 0, -1, 0, 1]]


def test_the_loss_is_cross_entropy_over_the_allowed_codes_and_the_full_vocabulary_for_text():
    softmax = small_softmax()
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 10)  # with a bias, which the sliced head must use too
    ids = torch.tensor([[2, 5, 8, 6, 7, 3, 5, 9]])
    hidden = torch.randn(7, 4)  # position p predicts token p + 1
    targets, nodes = ids[0, 1:], softmax.prefix_nodes(ids)[0, 1:]
    got = softmax.loss_sum(head, hidden, targets, nodes)

    logits = head(hidden)
    allowed = {  # (level, node) -> allowed token ids
        (0, 0): [5, 6],
        (1, 0): [8, 9],  # prefix a0: b1, b2
        (1, 1): [7],  # prefix a1: b0 only, so its loss is 0
    }
    expected = 0.0
    for p, (t, node) in enumerate(zip(targets.tolist(), nodes.tolist())):
        if t < 5:
            expected = expected - torch.log_softmax(logits[p], dim=0)[t]
        else:
            cols = allowed[(0 if t < 7 else 1, node)]
            expected = expected - (logits[p, t] - torch.logsumexp(logits[p, cols], dim=0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got.backward()
    assert head.weight.grad is not None and head.weight.grad[:5].abs().sum() > 0


def test_a_sid_outside_the_trie_is_refused():
    softmax = small_softmax()
    ids = torch.tensor([[2, 6, 8]])  # a1 b1 is no item's SID
    head = torch.nn.Linear(4, 10)
    with pytest.raises(ValueError, match="does not continue its prefix"):
        softmax.loss_sum(head, torch.randn(2, 4), ids[0, 1:], softmax.prefix_nodes(ids)[0, 1:])


def test_level_log_probs_normalise_over_the_allowed_codes_only():
    logits = torch.randn(3, 12)
    children = torch.tensor([[0, -1, 2, 3], [-1, -1, 5, -1], [-1, -1, -1, -1]])
    lp = level_log_probs(logits, 4, children >= 0, "trie")
    assert torch.allclose(lp[:2].exp().sum(1), torch.ones(2))
    assert torch.isinf(lp[children < 0]).all() and lp[1, 2] == 0
    assert torch.isinf(lp[2]).all() and not torch.isnan(lp).any()
    full = level_log_probs(logits, 4, children >= 0, "vocab")
    torch.testing.assert_close(full, torch.log_softmax(logits, dim=1)[:, 4:8])


def trie_brute_force_scores(model, input_ids, attention_mask, codes: np.ndarray, trie) -> torch.Tensor:
    """(B, N) sum over levels of each item's code log-prob under the softmax over the trie's allowed codes."""
    sid_tokens = torch.as_tensor(codes) + torch.tensor(OFFSETS)  # (N, L)
    size = trie.codebook_sizes[0]
    allowed = [trie.allowed(torch.as_tensor(codes[:, :t])) for t in range(LEVELS)]  # (N, size) each
    rows = []
    with torch.no_grad():
        for b in range(input_ids.shape[0]):
            prompt = input_ids[b][attention_mask[b].bool()]
            seq = torch.cat([prompt.expand(len(codes), -1), sid_tokens], dim=1)
            logits = model(input_ids=seq).logits.float()
            n, total = prompt.shape[0], torch.zeros(len(codes))
            for t in range(LEVELS):
                level = logits[:, n - 1 + t, OFFSETS[t] : OFFSETS[t] + size].masked_fill(~allowed[t], float("-inf"))
                total += torch.log_softmax(level, dim=1).gather(1, torch.as_tensor(codes[:, t : t + 1])).squeeze(1)
            rows.append(total)
    return torch.stack(rows)


def test_beam_search_and_sampling_under_the_trie_softmax_equal_brute_force():
    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    exact = trie_brute_force_scores(model, input_ids, attention_mask, codes, trie)  # (B, N)

    out = constrained_beam_search(
        model, input_ids, attention_mask, trie, OFFSETS, num_beams=128, num_return=20, sid_softmax="trie"
    )
    top_scores, top_items = exact.topk(20, dim=1)
    assert out.items.tolist() == top_items.tolist()
    torch.testing.assert_close(out.scores, top_scores, atol=1e-4, rtol=0)
    # Under the trie softmax the probabilities of all items sum to 1.
    torch.testing.assert_close(exact.exp().sum(1), torch.ones(4), atol=1e-4, rtol=0)
    vocab = constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, num_beams=128, num_return=20)
    assert vocab.items.tolist() != out.items.tolist(), "the two softmaxes should rank this random model differently"

    gen = torch.Generator().manual_seed(0)
    sampled = constrained_sample(model, input_ids, attention_mask, trie, OFFSETS, 16, generator=gen, sid_softmax="trie")
    torch.testing.assert_close(sampled.scores, exact.gather(1, sampled.items), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sid_softmax"):
        constrained_beam_search(model, input_ids, attention_mask, trie, OFFSETS, sid_softmax="items")


def test_candidate_scores_and_rl_log_probs_under_the_trie_softmax_equal_brute_force():
    from genrec.decode.beam import score_candidates
    from genrec.train.rl import completion_log_probs

    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    input_ids, attention_mask = make_prompts()
    exact = trie_brute_force_scores(model, input_ids, attention_mask, codes, trie)  # (B, N)
    offsets = torch.tensor(OFFSETS)
    items = torch.tensor([[3, 50, 7], [0, 99, 12], [5, 5, 61], [42, 8, -1]])  # (B, M); -1 pads
    cand = torch.where(items.unsqueeze(-1) >= 0, torch.as_tensor(codes)[items.clamp(min=0)] + offsets, -1)

    scores = score_candidates(model, input_ids, attention_mask, cand, trie, OFFSETS)
    expected = exact.gather(1, items.clamp(min=0)).masked_fill(items < 0, float("-inf"))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)

    live = torch.as_tensor(codes)[items.clamp(min=0)] + offsets  # completion_log_probs takes whole SIDs only
    with torch.no_grad():
        per_token = completion_log_probs(model, input_ids, attention_mask, live, offsets, trie)
    torch.testing.assert_close(per_token.sum(-1), exact.gather(1, items.clamp(min=0)), atol=1e-4, rtol=0)


def test_the_sft_loss_under_the_trie_softmax_is_the_mean_of_the_tokens_log_probs():
    from genrec.train.sft import NextTokenLoss

    model, codes = make_model(), make_codes()
    trie = make_trie(codes)
    softmax = TrieSoftmax(trie, SIDVocab([16] * LEVELS, OFFSETS), model.config.vocab_size)
    sids = torch.as_tensor(codes) + torch.tensor(OFFSETS)  # (N, L)
    # Two windows: a text head, then whole SIDs; the first item of each takes no loss, nor does padding.
    input_ids = torch.stack([torch.cat([torch.tensor([5, 6]), sids[[1, 2, 3]].flatten()]), torch.zeros(11).long()])
    input_ids[1, :8] = torch.cat([torch.tensor([7, 8]), sids[[4, 5]].flatten()])
    attention_mask = (torch.arange(11) < torch.tensor([[11], [8]])).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100
    with torch.no_grad():
        loss = NextTokenLoss(model, trie_softmax=softmax)(input_ids, attention_mask, labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    # Each labelled SID token against the codes its trie prefix allows, by walking the trie by hand.
    terms = []
    for b, n_items in ((0, 3), (1, 2)):
        for j in range(1, n_items):  # the first item of each window takes no loss
            sid = input_ids[b, 2 + j * LEVELS : 2 + (j + 1) * LEVELS] - torch.tensor(OFFSETS)
            for t in range(LEVELS):
                p = 2 + j * LEVELS + t - 1  # the position that predicts level t
                allowed = trie.allowed(sid[None, :t])[0]
                level = logits[b, p, OFFSETS[t] : OFFSETS[t] + 16].masked_fill(~allowed, float("-inf"))
                terms.append(-torch.log_softmax(level, dim=0)[sid[t]])
    assert len(terms) == (labels[:, 1:] != -100).sum() == 9
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=0)
