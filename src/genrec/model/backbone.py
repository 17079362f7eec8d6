"""The causal-LM backbone: a small Qwen2 trained from scratch, or a local pretrained checkpoint.

``model.backbone: scratch`` builds a Qwen2 from the sizes in ``ModelConfig`` over the
scratch tokenizer's vocabulary (tied input/output embeddings). Qwen2 has attention dropout
only; small from-scratch recommenders overfit without more, so ``add_residual_dropout``
puts GPT-2-style dropout on the embeddings and on each attention and MLP output (forward
hooks: the saved checkpoint stays a plain Qwen2).

``model.backbone: <dir>`` loads a Hugging Face checkpoint from that directory only
(``local_files_only``; genrec never downloads). The SID tokens are added to its tokenizer,
the embeddings grow to hold them, and their rows start at the mean of the existing token
embeddings (input and, when untied, output), so no SID starts out favoured. With
``model.lora_r > 0`` the backbone is frozen and trained through LoRA adapters on every
linear layer, plus the SID rows of the embeddings and of the LM head
(PEFT ``trainable_token_indices``): the new tokens need trained embeddings, the old ones
keep theirs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from genrec.config import ConfigError, ModelConfig
from genrec.model.prompt import PromptFormat
from genrec.model.vocab import SIDVocab

# RoPE has no learned position table; this only bounds the rotary cache of the scratch model.
SCRATCH_MAX_POSITIONS = 4096


@dataclass
class Backbone:
    model: object  # a transformers causal LM (a PeftModel with LoRA)
    tokenizer: object
    vocab: SIDVocab
    fmt: PromptFormat


def scratch_backbone(
    cfg: ModelConfig, tokenizer, codebook_sizes: Sequence[int], tasks: Iterable[str], seed: int
) -> Backbone:
    """A fresh Qwen2 over a scratch tokenizer (``build_scratch_tokenizer``), with residual dropout."""
    model = build_scratch_model(cfg, tokenizer, seed)
    add_residual_dropout(model, cfg.dropout)
    return Backbone(
        model, tokenizer, SIDVocab.from_tokenizer(tokenizer, codebook_sizes), PromptFormat.markers(tokenizer, tasks)
    )


def pretrained_backbone(cfg: ModelConfig, codebook_sizes: Sequence[int], tasks: Iterable[str]) -> Backbone:
    """The checkpoint and tokenizer of ``model.backbone``, extended with the SID tokens."""
    from genrec.model.tokenizer import add_sid_tokens, load_tokenizer

    tokenizer = load_tokenizer(backbone_dir(cfg))
    num_old = len(tokenizer)
    vocab = add_sid_tokens(tokenizer, codebook_sizes)
    # A directory that already holds the SID tokens (a genrec model trained before) keeps its rows.
    new_ids = vocab.all_token_ids() if len(tokenizer) > num_old else []
    model = load_pretrained_model(cfg, tokenizer, num_old, new_ids, vocab.all_token_ids())
    return Backbone(model, tokenizer, vocab, PromptFormat.instructions(tokenizer, tasks))


def is_scratch(cfg: ModelConfig) -> bool:
    return cfg.backbone == "scratch"


def backbone_dir(cfg: ModelConfig) -> Path:
    """The local checkpoint directory named by ``model.backbone``, checked."""
    path = Path(cfg.backbone).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.backbone={cfg.backbone!r} is not an existing directory. genrec never downloads models: "
            "set model.backbone=scratch, or to a local directory holding a Hugging Face causal LM "
            "(config.json, weights, tokenizer files)"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.backbone={cfg.backbone!r}: {path / 'config.json'} is missing; not a Hugging Face checkpoint"
        )
    return path


def scratch_qwen2(
    vocab_size: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, max_positions: int, **token_ids
):
    """A randomly initialised Qwen2 causal LM (tied embeddings, no attention dropout, SDPA attention).

    The one builder of every scratch decoder: the token layout's (``build_scratch_model``), the item
    layout's (``genrec.model.item_layout``) and the benchmarks'. ``token_ids``: ``pad_token_id`` and
    the like, passed to ``Qwen2Config``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        **token_ids,
    )
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")


def build_scratch_model(cfg: ModelConfig, tokenizer, seed: int):
    """A randomly initialised Qwen2 over the tokenizer's vocabulary."""
    import torch

    torch.manual_seed(seed)
    return scratch_qwen2(
        len(tokenizer),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        SCRATCH_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def load_pretrained_model(
    cfg: ModelConfig, tokenizer, num_old_tokens: int, new_ids: Sequence[int], sid_ids: Sequence[int]
):
    """The checkpoint in ``model.backbone`` with room for the SID tokens, optionally wrapped in LoRA.

    ``num_old_tokens`` is the tokenizer's length before the SID tokens were added; rows
    ``new_ids`` (input and output embeddings) are set to the mean of rows ``[0, num_old_tokens)``.
    LoRA trains the rows ``sid_ids``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = backbone_dir(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = torch.as_tensor(list(new_ids), dtype=torch.long)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            weight = emb.weight  # (V, H); tied embeddings are one module, so each table is set once
            weight[rows] = weight[:num_old_tokens].mean(dim=0)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    if cfg.lora_r > 0:
        model = add_lora(model, cfg, sid_ids)
    return model


def add_lora(model, cfg: ModelConfig, sid_ids: Sequence[int]):
    """Freeze the model; train LoRA on every linear layer and the SID rows of embeddings and LM head."""
    from peft import LoraConfig, get_peft_model

    ids = [int(i) for i in sid_ids]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        trainable_token_indices={
            _module_name(model, model.get_input_embeddings()): ids,
            _module_name(model, model.get_output_embeddings()): ids,
        },
    )
    return get_peft_model(model, lora)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).split(".")[-1]


def add_residual_dropout(model, p: float) -> list:
    """Dropout on the token embeddings and on every attention and MLP output; returns the hook handles.

    Active only in train mode (``module.training``), so decoding is deterministic.
    """
    import torch.nn.functional as F

    if p <= 0:
        return []

    def drop(module, args, output):
        if isinstance(output, tuple):  # attention returns (hidden, weights)
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    decoder = model.get_decoder()
    handles = [model.get_input_embeddings().register_forward_hook(drop)]
    for layer in decoder.layers:
        handles.append(layer.self_attn.register_forward_hook(drop))
        handles.append(layer.mlp.register_forward_hook(drop))
    return handles


def count_parameters(model) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` that feeds a KV cache to ``model``'s forward under this transformers version.

    transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` (the old name
    warns on every call and goes in 5.40); older releases know only ``past_key_values``. The
    model's own signature decides, through PEFT and DDP wrappers.
    """
    return {_cache_argument(type(unwrap_model(model))): cache}


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned (``cache`` or, before 5.x, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def unwrap_model(model):
    """The transformers model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
