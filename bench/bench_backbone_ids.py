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
trains each position's softmax over the tokens that the trie allows there only.

    python bench/bench_backbone_ids.py bench/out/baselines/beauty/seed_1 --arch qwen2 \\
        --out bench/out/backbone/q64_s1 --seed 1
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
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from genrec.model.backbone import add_residual_dropout

        config = Qwen2Config(
            vocab_size=num_items + 1,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_len,
            attention_dropout=0.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            pad_token_id=0,
        )
        self.lm = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
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


class SIDHeadItems(Qwen2Items):
    """The id model's layout (one position per item) with the generative model's output: the next item's
    Semantic ID, generated level by level on the trie from that one position's state.

    ``codes`` (N, L) are a ``sid`` stage's codes. Level 0's logits are ``h @ W_0``; level ``l``'s are
    ``z @ W_l`` with ``z = u + MLP_l(LN(u))`` and ``u = h + W_0[c_0] + ... + W_{l-1}[c_{l-1}]`` (the prefix
    chosen so far, read through the levels' own output rows), each softmax over the codes that the trie
    allows after the prefix. So an item's log-probability is the sum of its levels', as beam search on the
    trie scores it, and the position that predicts every level holds the last item in its residual stream
    (the generative layout's item tokens are predicted from their group code's position instead). With
    ``sid_input`` an item's input is the sum of its codes' rows ``W_l[c_l]`` (Semantic IDs in, Semantic IDs
    out, no per-item parameter anywhere); without, the id model's learned item table.
    """

    def __init__(
        self,
        codes,
        max_len: int,
        hidden: int,
        layers: int,
        heads: int,
        ffn: int,
        dropout: float,
        sid_input: bool,
        item_vectors=None,
    ):
        import numpy as np

        codes = np.asarray(codes, dtype=np.int64)
        num_items, L = codes.shape
        super().__init__(0 if sid_input else num_items, max_len, hidden, layers, heads, ffn, dropout)
        self.num_items, self.sid_input, self.p = num_items, sid_input, dropout
        # Frozen (N + 1, D) vectors (row 0 padding) through a trained D -> H projection, or None.
        self.register_buffer("item_vectors", None, persistent=False)
        if item_vectors is not None:
            rows = torch.cat([torch.zeros(1, item_vectors.shape[1]), torch.as_tensor(item_vectors).float()])
            self.register_buffer("item_vectors", rows, persistent=False)
            self.item_proj = torch.nn.Linear(rows.shape[1], hidden, bias=False)
            torch.nn.init.normal_(self.item_proj.weight, std=0.02)
        self.sizes = [int(codes[:, level].max()) + 1 for level in range(L)]
        self.code_emb = torch.nn.ModuleList(torch.nn.Embedding(k, hidden) for k in self.sizes)
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, hidden)
            )
            for _ in range(L)
        )
        for module in [*self.code_emb, *self.mlp]:
            for param in module.parameters():
                if param.dim() > 1:
                    torch.nn.init.normal_(param, std=0.02)
        # The trie: each item's prefix node at each level, each node's allowed codes and its prefix codes.
        nodes, self.multi_nodes = [], []
        pad = np.zeros((1, L), dtype=np.int64)
        self.register_buffer("codes", torch.as_tensor(np.concatenate([pad, codes])), persistent=False)
        for level in range(L):
            prefixes, node = np.unique(codes[:, :level], axis=0, return_inverse=True)
            node = node.reshape(-1)
            allowed = np.zeros((len(prefixes), self.sizes[level]), dtype=bool)
            allowed[node, codes[:, level]] = True
            nodes.append(node)
            self.register_buffer(f"allowed_{level}", torch.as_tensor(allowed), persistent=False)
            self.register_buffer(
                f"prefix_{level}", torch.as_tensor(prefixes.reshape(len(prefixes), level)), persistent=False
            )
        self.register_buffer("nodes", torch.as_tensor(np.stack(nodes, axis=1)), persistent=False)  # (N, L)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        if not self.sid_input:
            return super().embed(seq)
        codes = self.codes[seq]  # (B, T, L); padding (row 0) is masked below
        x = sum(emb(codes[..., level]) for level, emb in enumerate(self.code_emb))
        if self.item_vectors is not None:
            x = x + self.item_proj(self.item_vectors[seq])
        x = x * (seq > 0).unsqueeze(-1)
        return torch.nn.functional.dropout(x, self.p, self.training)

    def level_state(self, u: torch.Tensor, level: int) -> torch.Tensor:
        """u (..., H): the state plus its prefix's rows -> the vector that scores the level's codes."""
        if level == 0:
            return u
        return u + torch.nn.functional.dropout(self.mlp[level](u), self.p, self.training)

    def level_logits(self, u: torch.Tensor, level: int) -> torch.Tensor:
        """u (..., H): the state plus its prefix's rows -> logits (..., K_level)."""
        return self.level_state(u, level) @ self.code_emb[level].weight.T

    def window_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-forced NLL of each target's Semantic ID (sum over levels, mean over positions)."""
        loss, u = 0.0, h
        for level in range(len(self.sizes)):
            code = self.codes[targets + 1, level]
            allowed = getattr(self, f"allowed_{level}")[self.nodes[targets, level]]
            logits = self.level_logits(u, level).masked_fill(~allowed, float("-inf"))
            loss = loss + torch.nn.functional.cross_entropy(logits, code)
            u = u + self.code_emb[level](code)
        return loss

    @torch.no_grad()
    def score(self, histories) -> torch.Tensor:
        """Every item's exact log-probability, level by level over the trie's edges (node, code).

        Only the nodes with more than one child are computed (an only child has log-probability 0); a level's
        logits are taken on its edges alone, not on every code under every node, so that a level of one
        code per item (``sid.collision=item``) costs one dot product per item. Users go in chunks that keep
        the gathered states (users x edges x H) near 16M floats.
        """
        h = self.encode(histories)  # (B, H)
        lp = torch.zeros(len(h), self.num_items, device=h.device)
        for level in range(len(self.sizes)):
            allowed = getattr(self, f"allowed_{level}")
            multi = torch.nonzero(allowed.sum(1) > 1).squeeze(1)  # (m,)
            if len(multi) == 0:
                continue
            where = torch.full((len(allowed),), -1, dtype=torch.long, device=h.device)
            where[multi] = torch.arange(len(multi), device=h.device)
            row = where[self.nodes[:, level]]  # (N,): the item's node among the m, -1 = an only child
            items = torch.nonzero(row >= 0).squeeze(1)
            edges, item_edge = torch.unique(
                torch.stack([row[items], self.codes[items + 1, level]], dim=1), dim=0, return_inverse=True
            )  # (E, 2): (node among the m, code)
            prefix = getattr(self, f"prefix_{level}")[multi]  # (m, level)
            rows = sum((self.code_emb[k](prefix[:, k]) for k in range(level)), torch.zeros_like(h[:1]))  # (m, H)
            out = self.code_emb[level].weight[edges[:, 1]]  # (E, H)
            chunk = max(1, (1 << 24) // (len(edges) * h.shape[1]))
            for s in range(0, len(h), chunk):
                z = self.level_state(h[s : s + chunk].unsqueeze(1) + rows.unsqueeze(0), level)  # (b, m, H)
                logits = (z[:, edges[:, 0]] * out).sum(-1)  # (b, E)
                top = torch.full((len(z), len(multi)), float("-inf"), device=h.device)
                top = top.scatter_reduce(1, edges[:, 0].expand_as(logits), logits, "amax")
                total = torch.zeros_like(top).scatter_add(
                    1, edges[:, 0].expand_as(logits), (logits - top[:, edges[:, 0]]).exp()
                )
                edge_lp = logits - (total.log() + top)[:, edges[:, 0]]
                lp[s : s + chunk, items] += edge_lp[:, item_edge]
        return lp


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
    ap.add_argument("--sid-input", action="store_true", help="sid-head: items in as the sum of their codes' rows")
    ap.add_argument(
        "--sasrec-input", action="store_true", help="sid-head --sid-input: plus the run's SASRec item vectors, frozen"
    )
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
            vectors = None
            if args.sasrec_input:
                vectors = SASRec.load(args.run_dir / "sasrec" / "model.pt").item_emb.weight[1:].detach()
            return SIDHeadItems(np.load(args.codes), *sizes, sid_input=args.sid_input, item_vectors=vectors)
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
        "arch": args.arch
        + (" (sid input)" if args.sid_input else "")
        + (" + sasrec vectors" if args.sasrec_input else ""),
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
