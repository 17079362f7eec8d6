"""Which softmax a SID token's probability is taken under: the whole vocabulary, or the trie's allowed codes.

``vocab`` (the default): ``log p(token) = logit - logsumexp(all V logits)``, what a plain causal LM
computes, so mass the model puts on text tokens or on another level's codes costs the item.
``trie``: ``log p(code) = logit - logsumexp(logits of the codes the trie allows after the SID
prefix)``, the factorisation ``P(item) = prod_l P(c_l | c_<l, history)`` over valid SIDs only.

The SFT loss (``sft.sid_softmax``), the beam search's scores, sampling, RL's policy log-probs and
candidate scoring must all use the same one, so the choice is saved with the model
(``GenerativeRecommender.sid_softmax``, in ``genrec.json``). SIDs written inside free text (GREAM's
rationales, DeepRec's turns) are sampled from the full-vocabulary softmax, which the trie loss does
not train, so those methods refuse ``trie`` (``GenerativeRecommender.check_free_text``). Under ``trie`` each position's
softmax competes only among the codes that can follow there: a level-0 token against the
other level-0 codes, a level-1 token against its siblings under the same prefix, and a
last-level code that is its prefix's only child costs nothing. The full-vocabulary loss
instead spends its gradient pushing down tokens the decoder can never choose at that position
(docs/sft.md, "The loss is most of it").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SID_SOFTMAXES = ("vocab", "trie")


def check_sid_softmax(name: str) -> str:
    if name not in SID_SOFTMAXES:
        raise ValueError(f"sid_softmax must be one of {', '.join(SID_SOFTMAXES)}, got {name!r}")
    return name


def level_log_probs(logits: torch.Tensor, offset: int, allowed: torch.Tensor, sid_softmax: str):
    """Log-probs of level ``t``'s codes, (N, V) logits -> (N, size).

    ``allowed`` (N, size) bool: the codes the trie allows after each row's prefix
    (``SIDTrie.allowed_mask``), the level's codes starting at token id ``offset``. Under ``vocab``
    the slice of the full-vocabulary log_softmax (disallowed codes keep their value; the caller
    masks them); under ``trie`` the log_softmax over the allowed codes alone, -inf elsewhere. A
    row with no allowed code is all -inf under ``trie``.
    """
    level = logits[:, offset : offset + allowed.shape[1]]
    if sid_softmax == "vocab":
        return level - torch.logsumexp(logits, dim=1, keepdim=True)
    masked = level.masked_fill(~allowed, float("-inf"))
    norm = torch.logsumexp(masked, dim=1, keepdim=True)
    return masked - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))


def sid_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, offsets: torch.Tensor, trie=None) -> torch.Tensor:
    """Teacher-forced log-probs (N, L) of N whole SIDs, token ids (N, L), from their logits (N, L, V).

    ``trie`` None: the full-vocabulary softmax; else the ``trie`` softmax along each SID's own
    path (``offsets`` (L,) the levels' first token ids). Every row must be an item's SID.
    """
    if trie is None:
        return logits.gather(2, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    codes = token_ids - offsets  # (N, L)
    nodes = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
    out = []
    for t in range(codes.shape[1]):
        allowed = trie.allowed_mask(t, nodes)  # (N, V_t)
        out.append(level_log_probs(logits[:, t], int(offsets[t]), allowed, "trie").gather(1, codes[:, t : t + 1]))
        nodes = trie.advance(t, nodes, codes[:, t])
    if bool((nodes < 0).any()):
        raise ValueError("a SID scored under the trie softmax is no item's SID")
    return torch.cat(out, dim=1)


class TrieSoftmax:
    """The ``trie`` SID softmax for teacher-forced sequences: per-position prefix nodes and the loss.

    ``level_of[v]`` is the SID level of token id ``v`` (-1 for every other token) and
    ``code_of[v]`` its code, so a batch's SID structure is read off its token ids alone: a
    level-``t`` token continues the prefix formed by the ``t`` tokens before it.
    """

    def __init__(self, trie, vocab, vocab_size: int):
        if trie.num_levels != vocab.num_levels:
            raise ValueError(f"the trie has {trie.num_levels} SID levels, the vocabulary {vocab.num_levels}")
        self.trie, self.offsets, self.sizes = trie, list(vocab.offsets), list(vocab.codebook_sizes)
        self.level_of = torch.full((vocab_size,), -1, dtype=torch.long)
        self.code_of = torch.zeros(vocab_size, dtype=torch.long)
        for t, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            if offset + size > vocab_size:
                raise ValueError(f"SID level {t} takes ids [{offset}, {offset + size}), outside {vocab_size} logits")
            self.level_of[offset : offset + size] = t
            self.code_of[offset : offset + size] = torch.arange(size)

    def to(self, device) -> TrieSoftmax:
        self.trie = self.trie.to(device)
        self.level_of, self.code_of = self.level_of.to(device), self.code_of.to(device)
        return self

    def prefix_nodes(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) long: the trie node of the SID prefix each token continues.

        0 (the root) for a level-0 SID token and for every non-SID token; -1 for a level-``t``
        token whose ``t`` predecessors are not the first ``t`` codes of some item.
        """
        level, code = self.level_of[input_ids], self.code_of[input_ids]
        nodes = torch.zeros_like(input_ids)
        for t in range(1, self.trie.num_levels):
            here = level[:, 1:] == t  # token j + 1 is of level t
            follows = self.trie.advance(t - 1, nodes[:, :-1][here], code[:, :-1][here])
            follows = torch.where(level[:, :-1][here] == t - 1, follows, torch.full_like(follows, -1))
            nodes[:, 1:][here] = follows
        return nodes

    def loss_sum(self, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, nodes: torch.Tensor):
        """Summed cross-entropy of ``targets`` (P,) from ``hidden`` (P, H) through the LM ``head``.

        A SID target's softmax runs over its level's codes that the trie allows after
        ``nodes`` (P,), the prefix node of the target (``prefix_nodes``); any other target's
        over the whole vocabulary. Only the needed rows of a plain ``nn.Linear`` head are multiplied.
        """
        levels = self.level_of[targets]
        total = hidden.new_zeros((), dtype=torch.float32)
        text = levels < 0
        if bool(text.any()):
            total = total + F.cross_entropy(head(hidden[text]).float(), targets[text], reduction="sum")
        for t, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            rows = levels == t
            if not bool(rows.any()):
                continue
            logits = _head_rows(head, hidden[rows], offset, size).float()  # (P_t, size)
            codes = self.code_of[targets[rows]]
            allowed = self.trie.allowed_mask(t, nodes[rows])  # (P_t, size)
            if not bool(allowed.gather(1, codes[:, None]).all()):
                raise ValueError(
                    f"a labelled SID token of level {t} does not continue its prefix in the item trie: a task wrote "
                    "a SID that is no item's, or split one (every SID must appear whole, level 0 first)"
                )
            total = total + F.cross_entropy(
                logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), codes, reduction="sum"
            )
        return total


def _head_rows(head: torch.nn.Module, hidden: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """Logits of token ids ``[offset, offset + size)``: (P, H) -> (P, size).

    A plain ``nn.Linear`` multiplies those rows only. Any other head (PEFT's trainable-token
    wrapper under LoRA, a quantised layer) runs whole and is sliced, so that whatever its forward
    does to the weight is kept.
    """
    if type(head) is torch.nn.Linear:
        bias = None if head.bias is None else head.bias[offset : offset + size]
        return F.linear(hidden, head.weight[offset : offset + size], bias)
    return head(hidden)[:, offset : offset + size]
