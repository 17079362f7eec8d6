"""Knowledge distillation from SASRec into the generative model's SID levels (``sft.distill``).

The SFT loss learns each target item's SID token by token against a one-hot label. A
trained SASRec (the ``sasrec`` stage) knows much more about the next item: a probability
for every item of the catalogue. ``SASRecTeacher`` turns that distribution into a target
for every SID level, along the target's own path, so that it matches what the student
predicts under teacher forcing:

    q_l(c) = sum over items i with codes[i, :l] == target[:l] and codes[i, l] == c of p_T(i)
             / sum over items i with codes[i, :l] == target[:l] of p_T(i)

that is, SASRec's probability of the next item factored level by level through the trie,
conditioned on the target's true leading codes. Its product over levels is SASRec's item
probability for any item on that path, so a student that matches every q_l ranks the items
as SASRec does. ``p_T`` is SASRec's softmax at temperature ``tau``; the student's softmax
is taken over the level's SID tokens only (the constrained decoder only ever chooses
among them), at the same temperature, and the term is scaled by ``tau**2`` (Hinton et
al., 2015) so that its gradients keep their size as ``tau`` changes:

    loss = CE(one-hot) + distill * tau**2 * mean over labelled SID tokens of KL(q_l || p_S,l)

Only examples that carry their items (``Example.items``: the ``seqrec`` windows) are
distilled; SASRec sees exactly the items the student sees before each target, in one
causal pass per window, the way SASRec itself trains (``genrec.baselines.sasrec``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def prefix_ids(codes: np.ndarray) -> np.ndarray:
    """(N, L) codes -> (N, L): column l numbers the distinct prefixes ``codes[:, :l]`` (column 0 is all 0).

    >>> prefix_ids(np.array([[0, 1], [0, 2], [1, 1]])).tolist()
    [[0, 0], [0, 0], [0, 1]]
    """
    out = np.zeros(codes.shape, dtype=np.int64)
    for level in range(1, codes.shape[1]):
        _, out[:, level] = np.unique(codes[:, :level], axis=0, return_inverse=True)
    return out


def level_targets(probs: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor, prefixes: torch.Tensor, width: int):
    """Per-level distillation targets, (Q, L, width), each row summing to 1: the definition.

    A pass over the whole catalogue per level; ``TriePaths`` computes the same in a few
    gathers and is what the trainer uses.

    ``probs`` (Q, N): the teacher's item distribution for each target; ``targets`` (Q,) the
    target items; ``codes`` and ``prefixes`` (N, L) as ``prefix_ids`` gives them; ``width``
    at least the largest codebook.
    """
    Q, L = len(targets), codes.shape[1]
    out = probs.new_zeros(Q, L, width)
    for level in range(L):
        on_path = prefixes[:, level].unsqueeze(0) == prefixes[targets, level].unsqueeze(1)  # (Q, N)
        mass = probs * on_path
        out[:, level].scatter_add_(1, codes[:, level].expand(Q, -1), mass)
    # The target itself is on its path, so the mass is > 0 unless the teacher's probability underflows.
    return out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)


class TriePaths:
    """``level_targets`` from the items in SID order, in a few gathers per level.

    In lexicographic SID order, the items under any prefix are contiguous, and so are those
    under each of its children. ``bounds[l][p, c]`` is the first position (in that order) of
    an item under prefix ``p`` (of length l) whose level-l code is >= c. Level 0's masses come
    from one cumulative sum over the catalogue; a deeper level gathers only the items under the
    target's prefix (at most ``span[l]`` of them) and sums them by code, so the small masses
    of deep levels are summed exactly rather than as differences of large sums.
    ``__call__`` takes the distributions in this order (``order``: item ids by SID).
    """

    def __init__(self, codes: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        self.num_levels, self.width = codes.shape[1], int(codes.max()) + 1
        order = np.lexsort(codes.T[::-1])  # level 0 first
        prefixes = prefix_ids(codes)  # ranks of the prefixes in the same lexicographic order
        self.order, self.prefixes = torch.from_numpy(order), torch.from_numpy(prefixes)
        self.sorted_codes = torch.from_numpy(np.ascontiguousarray(codes[order].T))  # (L, N)
        self.bounds, self.span = [], []
        for level in range(self.num_levels):
            size = int(codes[:, level].max()) + 1
            key = prefixes[order, level] * (size + 1) + codes[order, level]  # non-decreasing
            nodes = int(prefixes[:, level].max()) + 1
            queries = np.arange(nodes)[:, None] * (size + 1) + np.arange(size + 1)[None, :]
            bounds = np.searchsorted(key, queries, side="left")  # (nodes, size + 1)
            self.bounds.append(torch.from_numpy(bounds))
            self.span.append(int((bounds[:, -1] - bounds[:, 0]).max()))

    def to(self, device) -> TriePaths:
        for name in ("order", "prefixes", "sorted_codes"):
            setattr(self, name, getattr(self, name).to(device))
        self.bounds = [b.to(device) for b in self.bounds]
        return self

    def __call__(self, sorted_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``sorted_probs`` (Q, N) item distributions in ``order``, ``targets`` (Q,) item ids -> (Q, L, width)."""
        Q, N = sorted_probs.shape
        out = sorted_probs.new_zeros(Q, self.num_levels, self.width)
        root = self.bounds[0][0]  # (K_0 + 1,)
        cumsum = torch.cat([sorted_probs.new_zeros(Q, 1), torch.cumsum(sorted_probs, dim=1)], dim=1)
        out[:, 0, : len(root) - 1] = cumsum[:, root[1:]] - cumsum[:, root[:-1]]
        for level in range(1, self.num_levels):
            b = self.bounds[level][self.prefixes[targets, level]]  # (Q, K_l + 1)
            idx = b[:, :1] + torch.arange(self.span[level], device=b.device)  # (Q, span)
            inside = idx < b[:, -1:]
            idx = idx.clamp_max(N - 1)
            mass = sorted_probs.gather(1, idx) * inside
            out[:, level].scatter_add_(1, self.sorted_codes[level][idx], mass)
        return out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)


def distill_loss(
    logits: torch.Tensor,
    level_token_ids: torch.Tensor,
    level_mask: torch.Tensor,
    levels: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Mean KL(target || student) over Q labelled SID tokens, times ``temperature**2``.

    ``logits`` (Q, V) the student's logits at those tokens; ``levels`` (Q,) their SID level;
    ``targets`` (Q, K) the teacher's distribution over the level's codes; ``level_token_ids``
    (L, K) each level's token id per code and ``level_mask`` (L, K) which of those exist.
    """
    student = logits.float().gather(1, level_token_ids[levels]) / temperature  # (Q, K)
    student = student.masked_fill(~level_mask[levels], torch.finfo(student.dtype).min)
    log_p = F.log_softmax(student, dim=-1)
    log_q = torch.log(targets.clamp_min(1e-30))
    kl = torch.where(targets > 0, targets * (log_q - log_p), torch.zeros_like(targets)).sum(-1)
    return kl.mean() * temperature**2


class SASRecTeacher:
    """SASRec's next-item distribution as per-level SID targets for the labelled tokens of a batch."""

    def __init__(self, sasrec, codes: np.ndarray, sid_token_ids: np.ndarray, temperature: float = 1.0):
        """``codes`` (N, L) the items' SIDs; ``sid_token_ids`` (N, L) their token ids in the student's vocabulary."""
        if sasrec.num_items != len(codes):
            raise ValueError(
                f"the SASRec teacher knows {sasrec.num_items} items but the SIDs cover {len(codes)}: "
                "rerun the 'sasrec' stage on this dataset"
            )
        if temperature <= 0:
            raise ValueError(f"sft.distill_temperature must be > 0, got {temperature}")
        self.sasrec = sasrec.eval()
        for p in self.sasrec.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        codes = np.asarray(codes, dtype=np.int64)
        self.paths = TriePaths(codes)
        self.num_levels, self.width = self.paths.num_levels, self.paths.width
        table = np.zeros((self.num_levels, self.width), dtype=np.int64)
        mask = np.zeros((self.num_levels, self.width), dtype=bool)
        for level in range(self.num_levels):
            table[level, codes[:, level]] = sid_token_ids[:, level]
            mask[level, codes[:, level]] = True
        # SASRec's item embeddings in SID order, so that its logits come out in that order.
        self.sorted_weight = self.sasrec.item_emb.weight.detach()[1:][self.paths.order]
        self.level_token_ids, self.level_mask = torch.from_numpy(table), torch.from_numpy(mask)

    def to(self, device) -> SASRecTeacher:
        self.sasrec.to(device)
        self.paths.to(device)
        self.sorted_weight = self.sorted_weight.to(device)
        self.level_token_ids, self.level_mask = self.level_token_ids.to(device), self.level_mask.to(device)
        return self

    @torch.no_grad()
    def batch(self, examples: Sequence, labelled_counts: Sequence[int]) -> dict[str, torch.Tensor] | None:
        """What ``NextTokenLoss`` needs to distil a batch, or None when no example carries its items.

        ``labelled_counts[b]``: how many labelled positions example b has (in the loss's
        flattened order, example after example). Returns ``kd_positions`` (Q,) into those
        positions, ``kd_levels`` (Q,), ``kd_targets`` (Q, K) and the level tables.
        """
        rows, targets, positions, levels = [], [], [], []
        offset = 0
        for e, count in zip(examples, labelled_counts):
            if e.items is not None:
                items = np.asarray(e.items, dtype=np.int64)
                n_targets = len(items) - e.target_from
                if n_targets * self.num_levels != count:
                    raise ValueError(
                        f"an example with {n_targets} target items of {self.num_levels} SID levels has {count} "
                        "labelled tokens: only examples whose labels are exactly their targets' SIDs can be distilled"
                    )
                if len(items) - 1 > self.sasrec.max_len:
                    raise ValueError(
                        f"a window of {len(items)} items needs a SASRec of max_len >= {len(items) - 1}, "
                        f"the teacher has {self.sasrec.max_len}: train it with the same data.max_history"
                    )
                rows.append((items, e.target_from))
                targets.append(items[e.target_from :])
                positions.append(offset + np.arange(count))
                levels.append(np.tile(np.arange(self.num_levels), n_targets))
            offset += count
        if not rows:
            return None
        device = self.level_mask.device
        # One causal pass per window, as SASRec trains: its hidden state at item j - 1 predicts item j.
        width = self.sasrec.max_len
        seq = np.zeros((len(rows), width), dtype=np.int64)
        pick_row, pick_col = [], []
        for r, (items, target_from) in enumerate(rows):
            n = len(items) - 1
            seq[r, width - n :] = items[:-1] + 1  # shifted ids, left-padded with 0
            cols = width - n + np.arange(target_from - 1, n)
            pick_row.append(np.full(len(cols), r))
            pick_col.append(cols)
        hidden = self.sasrec(torch.as_tensor(seq, device=device))  # (W, max_len, H)
        hidden = hidden[torch.as_tensor(np.concatenate(pick_row)), torch.as_tensor(np.concatenate(pick_col))]
        logits = (hidden @ self.sorted_weight.T) / self.temperature  # (Q_items, N), items in SID order
        per_level = self.paths(
            torch.softmax(logits.float(), dim=-1), torch.as_tensor(np.concatenate(targets)).to(device)
        )
        return {
            "kd_positions": torch.as_tensor(np.concatenate(positions), device=device),
            "kd_levels": torch.as_tensor(np.concatenate(levels), device=device),
            "kd_targets": per_level.reshape(-1, self.width),
            "level_token_ids": self.level_token_ids,
            "level_mask": self.level_mask,
        }
