"""Item-ID input embeddings (``model.item_embedding``): one vector per item, added at its last SID token.

A Semantic ID gives an item a few shared tokens; collaborative models such as SASRec give it
a vector of its own. With ``model.item_embedding`` the recommender reads both: wherever the
input holds a complete SID ``t_1 .. t_L`` (levels 0..L-1 in order, a real item), the item's
own vector is added to the input embedding of ``t_L``. ``learned`` trains an ``(N + 1, H)``
table; ``sasrec`` reads the run's SASRec item embeddings, frozen, through a trained ``D -> H``
projection; ``sasrec_states`` adds, through a second projection, the frozen SASRec's
representation of the history that ends at that item (a hybrid: SASRec runs on every prompt).
The output side is unchanged: the model still generates SIDs, decoded on the trie.

No target leaks into its own prediction: a token's logits predict the next token, and the
item vector sits on an item's last token, which predicts what comes after the item (the
next item's first SID token, or end of text). In trie-constrained beam search an item's last
token is never an input, and a one-token decoding step holds no complete SID at all. Free
text generation that writes several SIDs one token at a time (GREAM's reasoning mode, the
DeepRec agent) would give its generated SIDs no vector where teacher forcing gave one, so
the config refuses ``model.item_embedding`` with the ``gream_sft`` and ``agent_sft`` stages.

The SID -> item lookup is ``SIDTrie.lookup`` over each window of ``L`` tokens. The table is a
child module of the input embedding, which a forward hook (registered
ahead of residual dropout, so dropout sees the sum) reads: every call site keeps passing
``input_ids``, ``copy.deepcopy`` (the RL reference model) copies table and hook together,
and the Hugging Face checkpoint stays a plain causal LM, with the table saved beside it
(``save``/``load``; ``GenerativeRecommender`` does both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genrec.sid.trie import SIDTrie

ATTRIBUTE = "genrec_items"
FILENAME = "item_embedding.pt"


class ItemEmbedding(torch.nn.Module):
    """The ``(N + 1, H)`` table (row 0, for "no item here", stays zero) and the SID -> item trie."""

    def __init__(
        self,
        sid_ids: np.ndarray,
        vocab_size: int,
        hidden_size: int,
        init_std: float = 0.02,
        dropout: float = 0.0,
        pretrained: np.ndarray | None = None,
        encoder: torch.nn.Module | None = None,
    ):
        super().__init__()
        sid_ids = np.asarray(sid_ids, dtype=np.int64)
        if sid_ids.ndim != 2 or len(sid_ids) == 0:
            raise ValueError(f"sid_ids must be (num_items, num_levels), got shape {sid_ids.shape}")
        if sid_ids.min() < 0 or sid_ids.max() >= vocab_size:
            raise ValueError(f"sid_ids hold token ids outside the vocabulary of {vocab_size}")
        num_items, num_levels = sid_ids.shape
        level_of = np.full(vocab_size, -1, dtype=np.int64)
        code_of = np.zeros(vocab_size, dtype=np.int64)
        for level in range(num_levels):
            tokens = np.unique(sid_ids[:, level])
            if (level_of[tokens] >= 0).any():
                raise ValueError(f"SID level {level} shares token ids with another level")
            level_of[tokens] = level
            code_of[tokens] = np.arange(len(tokens))  # the token's rank among its level's tokens
        try:  # SID -> item by the trie's lookup, over the ranks as codes
            self.trie = SIDTrie(code_of[sid_ids])
        except ValueError as exc:
            raise ValueError(f"two items share a SID: item embeddings need collision-free SIDs; {exc}") from exc
        self.num_items, self.num_levels = num_items, num_levels
        self.register_buffer("level_of", torch.from_numpy(level_of), persistent=False)  # (V,) level or -1
        self.register_buffer("code_of", torch.from_numpy(code_of), persistent=False)  # (V,)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"item dropout must be in [0, 1), got {dropout}")
        self.sid_ids, self.dropout = sid_ids, dropout
        self.proj = None
        if pretrained is None:
            self.table = torch.nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
            with torch.no_grad():
                self.table.weight.normal_(0.0, init_std)
                self.table.weight[0].zero_()
        else:
            pretrained = torch.as_tensor(np.asarray(pretrained), dtype=torch.float32)
            if pretrained.shape[0] != num_items:
                raise ValueError(f"{pretrained.shape[0]} pretrained item vectors for {num_items} items")
            rows = torch.cat([torch.zeros(1, pretrained.shape[1]), pretrained])  # (N + 1, D), row 0 no item
            self.table = torch.nn.Embedding.from_pretrained(rows, freeze=True, padding_idx=0)
            self.proj = torch.nn.Linear(pretrained.shape[1], hidden_size, bias=False)
            with torch.no_grad():
                self.proj.weight.normal_(0.0, init_std)
        # ``sasrec_states``: the frozen SASRec (genrec.baselines.sasrec) that reads the history up
        # to each item of the input; its state there enters through ``state_proj``.
        self.encoder, self.state_proj = encoder, None
        if encoder is not None:
            if encoder.num_items != num_items:
                raise ValueError(f"the SASRec encoder has {encoder.num_items} items, the SIDs {num_items}")
            encoder.requires_grad_(False)
            encoder.eval()
            self.state_proj = torch.nn.Linear(encoder.item_emb.embedding_dim, hidden_size, bias=False)
            with torch.no_grad():
                self.state_proj.weight.normal_(0.0, init_std)

    def item_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) long: ``item_id + 1`` at the last token of each complete SID in ``input_ids``, else 0.

        >>> emb = ItemEmbedding(np.array([[5, 7], [6, 7], [6, 8]]), vocab_size=10, hidden_size=2)
        >>> emb.item_index(torch.tensor([[1, 6, 7, 5, 8, 7]])).tolist()
        [[0, 0, 2, 0, 0, 0]]
        """
        out = torch.zeros_like(input_ids)
        width = self.num_levels
        if input_ids.shape[1] < width:
            return out
        levels = self.level_of[input_ids].unfold(1, width, 1)  # (B, T - L + 1, L)
        complete = (levels == torch.arange(width, device=input_ids.device)).all(dim=-1)
        codes = self.code_of[input_ids].unfold(1, width, 1)  # (B, T - L + 1, L)
        items = self.trie.lookup(codes.reshape(-1, width)).view(complete.shape)  # -1: no item's SID
        out[:, width - 1 :] = torch.where(complete & (items >= 0), items + 1, 0)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: its dropout stays off in training too
        return self

    def states(self, index: torch.Tensor) -> torch.Tensor:
        """(B, T, D): at each item of ``index`` (``item_index``'s output), SASRec's state after it.

        The state at a row's ``k``-th item is SASRec's user representation of the history that
        ends there (its last ``max_len`` items, end-aligned, as ``SASRec.encode`` reads them):
        what beam search sees at the end of a prompt is what teacher forcing sees at that item,
        and no item ever reads a later one. One encoder pass per item of the batch.
        """
        mask = index > 0  # (B, T)
        max_len = self.encoder.max_len
        count = mask.sum(dim=1)  # (B,)
        width = int(count.max()) if index.numel() else 0
        states = torch.zeros(*index.shape, self.encoder.item_emb.embedding_dim, device=index.device)
        if width == 0:
            return states
        rank = mask.long().cumsum(dim=1) - 1  # (B, T): the item's place among its row's items
        items = torch.zeros(index.shape[0], width + 1, dtype=torch.long, device=index.device)  # column K: a sink
        items.scatter_(1, torch.where(mask, rank, width), index)  # (B, K + 1): SASRec's ids (item + 1) in order
        items = torch.nn.functional.pad(items[:, :width], (max_len - 1, 0))  # (B, max_len - 1 + K)
        windows = items.unfold(1, max_len, 1)  # (B, K, max_len): window k ends at item k
        live = torch.arange(width, device=index.device) < count.unsqueeze(1)  # (B, K)
        with torch.no_grad():
            states[mask] = self.encoder(windows[live])[:, -1]  # row-major (b, k) on both sides
        return states

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.trie.to(self.level_of.device)  # the trie is no module: it follows the buffers
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, H): each complete SID's item vector at its last token, zeros elsewhere.

        In train mode each occurrence loses its whole vector with probability ``dropout``, so
        the model keeps reading the SID tokens as well (at inference every vector is there).
        """
        index = self.item_index(input_ids)
        states = None if self.encoder is None else self.state_proj(self.states(index))  # before dropout
        if self.training and self.dropout > 0:
            index = index * (torch.rand(index.shape, device=index.device) >= self.dropout)
        vectors = self.table(index)
        vectors = vectors if self.proj is None else self.proj(vectors)
        return vectors if states is None else vectors + states

    def save(self, path: str | Path) -> None:
        state = {"sid_ids": torch.from_numpy(self.sid_ids), "weight": self.table.weight.detach().cpu()}
        if self.proj is not None:
            state["proj"] = self.proj.weight.detach().cpu()
        if self.encoder is not None:
            state["state_proj"] = self.state_proj.weight.detach().cpu()
            state["encoder"] = self.encoder.checkpoint()
        torch.save(state, path)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> ItemEmbedding:
        """The table of ``save`` for inference (a frozen pretrained table stays frozen)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight, proj = state["weight"], state.get("proj")
        sid_ids = state["sid_ids"].numpy()
        if weight.shape[0] != len(sid_ids) + 1:
            raise ValueError(f"{path}: {weight.shape[0]} rows for {len(sid_ids)} items (+1 for no item)")
        if proj is None:
            emb = cls(sid_ids, vocab_size, weight.shape[1])
            with torch.no_grad():
                emb.table.weight.copy_(weight)
        else:
            encoder = None
            if "encoder" in state:
                from genrec.baselines.sasrec import SASRec

                encoder = SASRec.from_checkpoint(state["encoder"])
            emb = cls(sid_ids, vocab_size, proj.shape[0], pretrained=weight[1:].numpy(), encoder=encoder)
            with torch.no_grad():
                emb.proj.weight.copy_(proj)
                if encoder is not None:
                    emb.state_proj.weight.copy_(state["state_proj"])
        return emb


def _add_items(module, args, output):
    return output + getattr(module, ATTRIBUTE)(args[0]).to(output.dtype)


def attach(model, items: ItemEmbedding) -> ItemEmbedding:
    """Put ``items`` under ``model``'s input embedding and add its vectors there (idempotent per module)."""
    embed = model.get_input_embeddings()
    items.to(next(embed.parameters()).device)
    first_time = not hasattr(embed, ATTRIBUTE)
    embed.add_module(ATTRIBUTE, items)
    if first_time:
        embed.register_forward_hook(_add_items, prepend=True)
    return items


def find(model) -> ItemEmbedding | None:
    """The item table attached to ``model`` (through DDP and PEFT wrappers), or None."""
    from genrec.model.backbone import unwrap_model

    return getattr(unwrap_model(model).get_input_embeddings(), ATTRIBUTE, None)


class detached:
    """Inside the block the table is out of the model (``save_pretrained`` writes a plain LM); back after."""

    def __init__(self, model):
        self.model, self.items = model, find(model)

    def __enter__(self):
        if self.items is not None:
            delattr(self.model.get_input_embeddings(), ATTRIBUTE)
        return self.items

    def __exit__(self, *exc):
        if self.items is not None:
            self.model.get_input_embeddings().add_module(ATTRIBUTE, self.items)
