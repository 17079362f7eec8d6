"""The generative model's Qwen2 block against SASRec's, both on item ids under SASRec's training.

On Beauty the generative recommender stays ~15% below SASRec however its Semantic IDs are
built, and without SIDs (one token per item) it is further below (docs/sft.md). This script
separates the two things that differ between them, the transformer and the training: it
trains a Qwen2 decoder (``genrec.model.backbone``'s residual dropout, RoPE, RMSNorm, SwiGLU,
tied embeddings) as a plain next-item model over item ids, with SASRec's own training loop
(``train_sasrec``: the same windows, batches, Adam, full-softmax cross-entropy, early
stopping on all valid users), and ranks the whole catalogue with the harness (``evaluate``).
``--arch sasrec`` trains SASRec itself through the same code, for the same-run baseline.
``--arch two-token`` writes each item as two tokens, its group code (column 0 of a ``sid``
stage's ``codes.npy``) then its own token, as ``sid.levels=1 sid.collision=item`` does, and
trains the same decoder with the same loop on every next token: the generative layout with
nothing else of the generative model (no task head, no frozen vectors, no text vocabulary).
``--carry`` adds the last item's token embedding at each group-code position; ``--constrained``
trains each position's softmax over the tokens that the trie allows there only. ``--arch sid-head``
is the pipeline's item layout (``model.layout: items``, ``genrec.model.item_layout``): one position
per item, read as the sum of its codes' rows (``--codes``: a ``sid`` stage's codes.npy), and the next
item's SID generated level by level from that position by a depth head; ``--sasrec-input`` adds the
run's SASRec item vectors, frozen, to the input.

    python bench/bench_backbone_ids.py bench/out/baselines/beauty/seed_1 --arch qwen2 \\
        --out bench/out/backbone/q64_s1 --seed 1
    python bench/bench_backbone_ids.py bench/out/baselines/beauty/seed_1 --arch sid-head \\
        --codes bench/out/explore/item1d3_s1/sid/codes.npy --out bench/out/backbone/sidhead_leaf_s1 --seed 1
    python bench/bench_backbone_ids.py bench/out/baselines/beauty/seed_1 --arch two-token \\
        --groups bench/out/explore/item1d3_s1/sid/codes.npy --out bench/out/backbone/two_s1 --seed 1

Sizes default to SASRec's (hidden 64, 2 layers, 2 heads, FFN 4 x hidden); ``--set`` overrides
any ``sasrec:`` field of the run's config (lr, dropout, max_epochs, ...). Writes the curves,
``eval/metrics.json`` and ``summary.json`` under --out; prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from genrec.baselines.sasrec import SASRec


class Qwen2Items(torch.nn.Module):
    """SASRec's interface (``forward``, ``item_logits``, ``score``) over a Qwen2 decoder; item id + 1 = token, 0 = padding."""

    def __init__(self, num_items: int, max_len: int, hidden: int, layers: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        from genrec.model.backbone import add_residual_dropout, scratch_qwen2

        self.lm = scratch_qwen2(num_items + 1, hidden, ffn, layers, heads, heads, max_len, pad_token_id=0)
        add_residual_dropout(self.lm, dropout)
        self.num_items, self.max_len = num_items, max_len

    @property
    def item_emb(self) -> torch.nn.Embedding:
        return self.lm.get_input_embeddings()

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """The input embeddings (B, T, H) of ``seq``, residual dropout included (the embedding's hook)."""
        return self.item_emb(seq)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) left-padded with 0 -> final hidden states (B, T, H); positions count real items only."""
        mask = (seq != 0).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return self.lm.model(
            inputs_embeds=self.embed(seq), attention_mask=mask, position_ids=positions
        ).last_hidden_state

    # SASRec's own: logits against the tied item rows, batching, the last position's state, scores.
    item_logits, _batch, encode, score = SASRec.item_logits, SASRec._batch, SASRec.encode, SASRec.score


class TwoTokenItems(Qwen2Items):
    """The same decoder on a two-token layout: item j is written ``group(j), own(j)``, as ``sid.levels=1
    sid.collision=item`` writes it, with no task head, no frozen vectors and no text vocabulary.

    Tokens: 0 padding, ``1 + g`` the group codes, ``1 + G + j`` the items. Trained on every next token
    under one softmax over the whole vocabulary (the generative model's loss); ``score`` gives
    ``log P(group) + log P(item | group)``, each renormalised over the allowed tokens as the trie-constrained
    decoder does, for the items of the ``top_groups`` most likely groups (the others get -1e9).
    """

    def __init__(self, groups, max_len: int, hidden: int, layers: int, heads: int, ffn: int, dropout: float):
        import numpy as np

        groups = np.asarray(groups, dtype=np.int64)
        self.num_groups = int(groups.max()) + 1
        super().__init__(self.num_groups + len(groups), 2 * max_len + 2, hidden, layers, heads, ffn, dropout)
        self.num_items, self.max_len = len(groups), max_len
        self.register_buffer("groups", torch.as_tensor(groups), persistent=False)
        self.top_groups = 8
        self.carry = False  # add the previous item token's embedding at each group-code position
        # Train each position's softmax over the tokens the trie allows after its input token only
        # (groups after an item, the group's items after a group code), as the scoring renormalises.
        self.constrained = False

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        self._inputs = seq  # item_logits reads the input tokens of the real positions (constrained)
        return super().forward(seq)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        x = super().embed(seq)
        if not self.carry:
            return x
        prev = torch.cat([torch.zeros_like(seq[:, :1]), seq[:, :-1]], dim=1)
        at_group = ((seq >= 1) & (seq <= self.num_groups) & (prev > self.num_groups)).unsqueeze(-1)
        return x + self.item_emb(prev) * at_group

    def tokens(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T) shifted item ids, left-padded with 0 -> (B, 2T) tokens, padding kept on the left."""
        real = seq > 0
        item = (seq - 1).clamp(min=0)
        pair = torch.stack([1 + self.groups[item], 1 + self.num_groups + item], dim=-1)  # (B, T, 2)
        return (pair * real.unsqueeze(-1)).flatten(1)

    def window_tokens(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SASRec's windows (inputs s_1..s_{n-1}, targets s_2..s_n) -> the token window and its next tokens.

        The full window s_1..s_n (the inputs, then the last target) is written out; the input drops its
        last token and the targets their first. Targets are token + 1 (0 = none), as ``train_sasrec``
        shifts its item ids, so that its loss over ``item_logits`` (here: every token) applies as it is.
        """
        full = torch.cat([inputs, targets[:, -1:]], dim=1)  # (W, T + 1): s_1..s_n, left-padded
        toks = self.tokens(full)
        return toks[:, :-1], torch.where(toks[:, :-1] > 0, toks[:, 1:] + 1, torch.zeros_like(toks[:, 1:]))

    def token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, padding included (the generative model's softmax)."""
        return h @ self.item_emb.weight.T

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """What train_sasrec's loss reads: ``h`` of the real positions (``h[seq > 0]``) -> token logits.

        Constrained, a position after an item token keeps the group codes, and one after group code g
        keeps g's items; every other token gets -inf.
        """
        logits = self.token_logits(h)
        if not self.constrained:
            return logits
        inputs = self._inputs[self._inputs > 0]  # (P,), aligned with h: train_sasrec keeps targets > 0
        if len(inputs) != len(h):
            raise ValueError(f"constrained logits need h of the {len(inputs)} real positions, got {len(h)} rows")
        G = self.num_groups
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        after_item = inputs > G
        allowed[after_item, 1 : 1 + G] = True
        after_group = ~after_item
        allowed[after_group, 1 + G :] = self.groups.unsqueeze(0) == (inputs[after_group] - 1).unsqueeze(1)
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def score(self, histories) -> torch.Tensor:
        G = self.num_groups
        M = min(self.top_groups, G)
        seq = self.tokens(self._batch(histories))  # (B, 2T)
        B = len(seq)
        last = torch.log_softmax(self.token_logits(self.forward(seq)[:, -1])[:, 1 : 1 + G], dim=-1)  # (B, G)
        top_lp, top_g = last.topk(M, dim=-1)  # (B, M)
        ext = torch.cat([seq.repeat_interleave(M, dim=0), 1 + top_g.reshape(-1, 1)], dim=1)  # (B*M, 2T+1)
        item_logits = self.token_logits(self.forward(ext)[:, -1])[:, 1 + G :]  # (B*M, N)
        in_group = self.groups.unsqueeze(0) == top_g.reshape(-1, 1)  # (B*M, N)
        lp = torch.log_softmax(item_logits.masked_fill(~in_group, float("-inf")), dim=-1) + top_lp.reshape(-1, 1)
        lp = lp.masked_fill(~in_group, -1e9).view(B, M, -1)
        return lp.max(dim=1).values  # each item lies in one group: its row's value, -1e9 elsewhere


def main() -> None:
    from genrec.baselines.sasrec import train_sasrec
    from genrec.config import EvalConfig, SASRecConfig
    from genrec.data.dataset import Dataset
    from genrec.eval.evaluate import evaluate
    from genrec.io import read_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with a finished prepare stage and its config.json")
    ap.add_argument("--arch", choices=["qwen2", "sasrec", "two-token", "sid-head"], default="qwen2")
    ap.add_argument("--groups", type=Path, default=None, help="two-token: a sid stage's codes.npy (column 0 = group)")
    ap.add_argument("--codes", type=Path, default=None, help="sid-head: a sid stage's codes.npy (all levels)")
    ap.add_argument("--sasrec-input", action="store_true", help="sid-head: plus the run's SASRec item vectors, frozen")
    ap.add_argument("--valid-users", type=int, default=3000, help="two-token, sid-head: valid users for early stopping")
    ap.add_argument("--top-groups", type=int, default=16, help="two-token: groups expanded per test user")
    ap.add_argument("--carry", action="store_true", help="two-token: the last item's embedding at each group code")
    ap.add_argument("--constrained", action="store_true", help="two-token: train on the trie's allowed tokens only")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides of the sasrec: section")
    ap.add_argument("--ffn", type=int, default=0, help="Qwen2 intermediate size (default 4 x hidden)")
    args = ap.parse_args()

    run_cfg = read_json(args.run_dir / "config.json")
    fields = dict(run_cfg["sasrec"])
    for item in args.set:
        key, value = item.split("=", 1)
        fields[key] = type(fields[key])(value) if fields.get(key) is not None else value
    cfg = SASRecConfig(**fields)
    max_history = run_cfg["data"]["max_history"]
    dataset = Dataset.load(args.run_dir / "prepare", max_history)
    max_len = cfg.max_len or max_history
    ffn = args.ffn or 4 * cfg.hidden_size
    sizes = (max_len, cfg.hidden_size, cfg.num_layers, cfg.num_heads, ffn, cfg.dropout)
    two_token = args.arch == "two-token"
    import numpy as np

    if two_token or args.arch == "sid-head":
        from genrec.train.sft import _valid_sample

        groups = np.load(args.groups)[:, 0] if two_token else None
        # Early stopping on the SFT stage's own fixed sample of valid users (8 groups expanded each).
        valid = _valid_sample(dataset, args.valid_users, args.seed)

    def build() -> torch.nn.Module:  # not for --arch sasrec: train_sasrec builds that from cfg itself
        if args.arch == "sid-head":
            from genrec.model.item_layout import ItemLayoutModel

            vectors = None
            if args.sasrec_input:
                vectors = SASRec.load(args.run_dir / "sasrec" / "model.pt").item_emb.weight[1:].detach()
            kv = sizes[3]  # as many key-value heads as heads, as Qwen2Items has
            return ItemLayoutModel(np.load(args.codes), *sizes[:4], kv, *sizes[4:], item_vectors=vectors)
        if not two_token:
            return Qwen2Items(dataset.num_items, *sizes)
        model = TwoTokenItems(groups, *sizes)
        model.carry, model.constrained = args.carry, args.constrained
        return model

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, curves = train_sasrec(
        dataset,
        cfg,
        max_history,
        args.seed,
        args.out / "work",
        256 if two_token or args.arch == "sid-head" else 512,
        build_model=None if args.arch == "sasrec" else build,
        valid_examples=valid if two_token or args.arch == "sid-head" else None,
    )
    if two_token:
        model.top_groups = args.top_groups
    seconds = time.time() - started
    write_json(args.out / "curves.json", curves)
    result = evaluate(
        model.score, dataset, EvalConfig(**run_cfg["eval"]), args.out / "eval", seed=args.seed, model_name=args.arch
    )
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    summary = {
        "arch": args.arch + (" + sasrec vectors" if args.sasrec_input else ""),
        "seed": args.seed,
        "sasrec": dataclasses.asdict(cfg),
        "ffn": ffn,
        "params": params,
        "epochs": len(curves),
        "best_valid_ndcg@10": max((r.get("valid_ndcg@10", -1) for r in curves), default=-1),
        "test_ndcg@10": result["test"]["ndcg@10"],
        "test_hr@10": result["test"]["hr@10"],
        "train_seconds": round(seconds, 1),
    }
    write_json(args.out / "summary.json", summary)
    print({k: v for k, v in summary.items() if k != "sasrec"})


if __name__ == "__main__":
    main()
