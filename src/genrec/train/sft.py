"""Multi-task SFT of the generative recommender, through ``accelerate`` (stage ``sft``).

The same loop runs on one CPU, on several CPU processes (DDP over gloo:
``torchrun --standalone --nproc_per_node N -m genrec.cli sft CONFIG``) and on GPUs
(``accelerate launch --multi_gpu --num_processes N -m genrec.cli sft CONFIG``). Each epoch:

1. every task draws its examples (``genrec.tasks.base.epoch_examples``, by weight);
2. the examples are grouped into batches of at most ``sft.batch_tokens`` padded tokens,
   similar lengths together; batch ``b`` goes to process ``b % num_processes``;
3. AdamW with warmup and cosine/linear decay, gradient clipping; the loss is the token
   mean of the next-token cross-entropy over the labelled positions only (logits are
   computed for those positions alone, not for the whole sequence);
4. every ``eval_every`` epochs, valid NDCG@10 / HR@10 by constrained beam search over a
   fixed sample of ``eval_users`` valid users (split across processes), exactly as the
   ``eval`` stage ranks; the best weights are kept, and ``patience`` evaluations without
   improvement stop training;
   With ``sft.ema_decay`` the evaluated and kept weights are an exponential moving average
   of the trained ones (``WeightAverage``), carried in every checkpoint;
5. a checkpoint (model, optimizer, scheduler, every process's RNG, epoch/step, best
   metric, curves) goes to the stage's work directory, so a killed run resumes after its
   last finished epoch and ends with exactly the weights of an uninterrupted run.

Everything random is derived from ``cfg.seed``: the epoch's examples and batches from
(seed, epoch), dropout from the torch RNG saved in each checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genrec.config import SASREC_ITEM_EMBEDDINGS, ConfigError, RunConfig, config_hash
from genrec.data.dataset import Dataset, Examples
from genrec.io import atomic_write_text, read_json, write_json
from genrec.model.backbone import unwrap_model

log = logging.getLogger("genrec")


class NextTokenLoss(torch.nn.Module):
    """Mean cross-entropy of the labelled next tokens; the LM head runs on labelled positions only.

    With ``distill`` (``SASRecTeacher.batch``: positions among the labelled ones, their SID
    levels and the teacher's per-level targets), ``distill_weight`` times the distillation
    term of ``genrec.train.distill`` is added. Wrapping the LM in one module lets DDP see
    the whole forward pass.
    """

    def __init__(self, lm, distill_weight: float = 0.0, distill_temperature: float = 1.0, trie_softmax=None):
        super().__init__()
        self.lm = lm
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.trie_softmax = trie_softmax  # genrec.model.sid_softmax.TrieSoftmax under sft.sid_softmax: trie

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        distill: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        base = unwrap_model(self.lm)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        target = labels[:, 1:]  # (B, T-1): position p predicts token p + 1
        keep = target != -100
        head, kept = base.get_output_embeddings(), hidden[:, :-1][keep]  # (P, H)
        logits = None
        if self.trie_softmax is None:
            logits = head(kept)  # (P, V)
            loss = F.cross_entropy(logits.float(), target[keep])
        else:  # the head runs on each level's rows only (and on the distilled positions below)
            nodes = self.trie_softmax.prefix_nodes(input_ids)[:, 1:][keep]  # (P,): the prefix each target continues
            loss = self.trie_softmax.loss_sum(head, kept, target[keep], nodes) / max(1, int(keep.sum()))
        if distill is not None and self.distill_weight > 0:
            from genrec.train.distill import distill_loss

            rows = distill["kd_positions"]
            kd = distill_loss(
                logits[rows] if logits is not None else head(kept[rows]),
                distill["level_token_ids"],
                distill["level_mask"],
                distill["kd_levels"],
                distill["kd_targets"],
                self.distill_temperature,
            )
            loss = loss + self.distill_weight * kd
        return loss


def token_batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped so that (batch size x longest example) <= batch_tokens.

    Examples are shuffled, sorted by length inside chunks of about 64 batches (little
    padding, yet every epoch mixes differently), and the batches shuffled again. An
    example longer than batch_tokens is a batch alone.
    """
    order = rng.permutation(len(lengths))
    per_batch = max(1, batch_tokens // max(1, int(np.median(lengths)) if len(lengths) else 1))
    chunk = 64 * per_batch
    batches = []
    for c in range(0, len(order), chunk):
        part = order[c : c + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        start = 0
        while start < len(part):
            end = start + 1
            while end < len(part) and (end + 1 - start) * lengths[part[end]] <= batch_tokens:
                end += 1
            batches.append(part[start:end])
            start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), -100, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n], labels[b, :n], mask[b, :n] = e.input_ids, e.labels, 1
    return {
        "input_ids": torch.from_numpy(input_ids).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
        "labels": torch.from_numpy(labels).to(device),
    }


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warmup, then cosine/linear decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def _mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"best weights hold unknown parameters {result.unexpected_keys[:5]}: the work dir is stale")


class WeightAverage:
    """Exponential moving average of a model's trainable weights, swapped in to evaluate and save them.

    ``update(step)`` after each optimizer step moves the average towards the weights by
    ``1 - d``, with ``d = min(decay, (1 + step) / (10 + step))`` so that the first steps' random
    weights fade fast. ``copy_to_model()`` puts the average in the model's parameters;
    ``swapped()`` does so for the body of a ``with`` block and puts the trained weights back after it.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.average)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, trained)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.cpu().clone() for n, a in zip(self.names, self.average)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError("the checkpoint's weight average holds other parameters: the work dir is stale")
        for n, a in zip(self.names, self.average):
            a.copy_(state[n])


def _latest_checkpoint(work_dir: Path) -> Path | None:
    pointer = work_dir / "latest.json"
    if not pointer.is_file():
        return None
    path = work_dir / read_json(pointer)["checkpoint"]
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete: delete {work_dir} to start over")
    return path


def _prepare_tokenizer(cfg: RunConfig, accelerator, work_dir: Path, codebook_sizes, task_names, item_texts):
    """The scratch tokenizer, trained once by the main process and saved, so a resumed run reuses it."""
    from genrec.model.tokenizer import build_scratch_tokenizer, load_tokenizer

    path = work_dir / "tokenizer"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not path.is_dir():
            tokenizer = build_scratch_tokenizer(item_texts, cfg.model.text_vocab_size, codebook_sizes, task_names)
            tmp = work_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            tmp.rename(path)
    return load_tokenizer(path)


def _valid_sample(dataset: Dataset, eval_users: int, seed: int) -> Examples:
    valid = dataset.examples("valid")
    if len(valid) == 0:
        raise ValueError("the dataset has no valid targets, so SFT cannot early-stop: prepare it with a valid split")
    idx = np.arange(len(valid))
    if eval_users and eval_users < len(valid):
        idx = np.sort(np.random.default_rng([seed, 7]).choice(len(valid), eval_users, replace=False))
    return Examples(
        "valid",
        valid.user_ids[idx],
        [valid.histories[i] for i in idx],
        valid.targets[idx],
        [valid.seen[i] for i in idx],
    )


def _valid_metrics(recommender, valid: Examples, cfg: RunConfig, accelerator) -> dict[str, float]:
    """NDCG@10 and HR@10 over ``valid``, each process ranking its share, as the ``eval`` stage ranks."""
    from accelerate.utils import gather_object

    from genrec.eval.evaluate import rank_examples
    from genrec.eval.generative import beam_ranker, num_beams_for
    from genrec.eval.metrics import compute_metrics, target_ranks

    mine = np.arange(accelerator.process_index, len(valid), accelerator.num_processes)
    share = Examples(
        "valid",
        valid.user_ids[mine],
        [valid.histories[i] for i in mine],
        valid.targets[mine],
        [valid.seen[i] for i in mine],
    )
    eval_cfg = replace(cfg.eval, batch_size=cfg.decode.batch_size)
    ranker = beam_ranker(recommender, num_beams_for(cfg, cfg.data.max_history))
    ranks = target_ranks(rank_examples(ranker, share, eval_cfg, recommender.num_items, desc="sft valid"), share.targets)
    all_ranks = np.asarray(gather_object(ranks.tolist()), dtype=np.int64)
    metrics = compute_metrics(all_ranks, [10])
    return {"valid_ndcg@10": metrics["ndcg@10"], "valid_hr@10": metrics["hr@10"]}


def _attach_item_embedding(cfg: RunConfig, backbone, codes: np.ndarray, sasrec) -> None:
    """``model.item_embedding``: a learned table, or SASRec's item rows (frozen) through a projection
    (with ``sasrec_states``, a frozen copy of SASRec itself as well)."""
    from genrec.model.item_embedding import ItemEmbedding, attach

    pretrained = encoder = None
    if cfg.model.item_embedding in SASREC_ITEM_EMBEDDINGS:
        if sasrec is None:
            raise ConfigError(
                f"model.item_embedding: {cfg.model.item_embedding} needs the run's SASRec, which only the 'sft' "
                "stage loads"
            )
        pretrained = sasrec.item_emb.weight[1:].detach().cpu().numpy()  # (N, D); row 0 is SASRec's padding
        if cfg.model.item_embedding == "sasrec_states":
            import copy

            encoder = copy.deepcopy(sasrec)
    config = unwrap_model(backbone.model).config
    table = ItemEmbedding(
        backbone.vocab.sid_to_ids(codes),
        backbone.model.get_input_embeddings().weight.shape[0],
        config.hidden_size,
        getattr(config, "initializer_range", 0.02),
        dropout=cfg.model.item_dropout,
        pretrained=pretrained,
        encoder=encoder,
    )
    attach(backbone.model, table)


def train_sft(
    cfg: RunConfig,
    dataset: Dataset,
    codes: np.ndarray,
    item_texts: list[str],
    out_dir: str | Path,
    work_dir: str | Path,
    extra_tasks: dict[str, Callable] | None = None,
    on_epoch_end: Callable[[dict, object], None] | None = None,
    teacher=None,
) -> dict:
    """Train, keep the best valid NDCG@10 weights, and save the recommender to ``out_dir/model``.

    ``codes`` (N, L) are the items' SIDs, ``item_texts`` their composed texts (item_id order).
    ``extra_tasks`` adds task builders to ``genrec.tasks.TASKS`` for this call.
    ``on_epoch_end(row, model)`` runs in every process after each epoch's checkpoint is
    written, with the row of ``curves.jsonl`` and the (unwrapped) causal LM. ``teacher``, a
    trained ``SASRec`` of the same dataset, is required when ``sft.distill`` > 0 or
    ``model.item_embedding`` reads SASRec. Resumes from ``work_dir`` when it holds a checkpoint. Writes
    ``out_dir/model``, ``curves.jsonl`` and ``train_summary.json``; returns the summary.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from tqdm import tqdm

    from genrec.model.backbone import count_parameters, is_scratch, pretrained_backbone, scratch_backbone
    from genrec.model.recommender import GenerativeRecommender
    from genrec.sid.trie import SIDTrie
    from genrec.tasks import TASKS
    from genrec.tasks.base import TaskData, epoch_examples

    sft = cfg.sft
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    builders = {**TASKS, **(extra_tasks or {})}
    unknown = [t for t in sft.tasks if t not in builders]
    if unknown:
        raise ConfigError(f"sft.tasks: unknown task {unknown[0]!r}; known tasks: {', '.join(sorted(builders))}")
    task_names = [t for t, w in sft.tasks.items() if w > 0]
    codes = _check_codes(codes, dataset.num_items)
    if sft.distill > 0 and teacher is None:
        raise ConfigError("sft.distill > 0 needs the SASRec teacher, which only the 'sft' stage loads")
    if sft.distill > 0 and "seqrec" not in task_names:
        raise ConfigError("sft.distill > 0 distils the seqrec task's targets: add seqrec to sft.tasks")
    if len(item_texts) != dataset.num_items:
        raise ValueError(f"{len(item_texts)} item texts for {dataset.num_items} items: rerun the 'text' stage")
    codebook_sizes = (codes.max(axis=0) + 1).tolist()

    # cpu=True where there is no GPU, so that torchrun / accelerate launch run DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(sft.mixed_precision))
    work_dir.mkdir(parents=True, exist_ok=True)
    _reset_stale_work_dir(accelerator, work_dir, _fingerprint(cfg, dataset, codes, item_texts, task_names, teacher))
    set_seed(cfg.seed)
    if is_scratch(cfg.model):
        tokenizer = _prepare_tokenizer(cfg, accelerator, work_dir, codebook_sizes, task_names, item_texts)
        backbone = scratch_backbone(cfg.model, tokenizer, codebook_sizes, task_names, cfg.seed)
    else:
        backbone = pretrained_backbone(cfg.model, codebook_sizes, task_names)
    if cfg.model.item_embedding != "none":
        _attach_item_embedding(cfg, backbone, codes, teacher)
    trie = SIDTrie(codes, codebook_sizes)
    params = count_parameters(backbone.model)

    data = TaskData(
        dataset.train_sequences(),
        backbone.vocab.sid_to_ids(codes),
        item_texts,
        dataset.titles,
        backbone.tokenizer,
        cfg.data.max_history,
        sft.window_stride,
        sft.text_history,
        sft.max_text_tokens,
    )
    sets = [builders[name](data, backbone.fmt) for name in task_names]
    for name, examples in zip(task_names, sets):
        if len(examples) == 0:
            raise ValueError(f"sft.tasks: task {name!r} has no examples on this dataset; drop it from sft.tasks")
    weights = [sft.tasks[name] for name in task_names]
    lengths = [np.asarray(s.lengths, dtype=np.int64) for s in sets]

    def epoch_plan(epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(rows (M, 2) of (task, example), this process's batches of row indices)."""
        rows = epoch_examples(sets, weights, cfg.seed, epoch)
        row_lengths = np.zeros(len(rows), dtype=np.int64)
        for s, task_lengths in enumerate(lengths):
            mine = rows[:, 0] == s
            row_lengths[mine] = task_lengths[rows[mine, 1]]
        batches = token_batches(row_lengths, sft.batch_tokens, np.random.default_rng([cfg.seed, epoch, 1]))
        world = accelerator.num_processes
        # Every process must take the same number of steps; the few batches left over are dropped.
        batches = batches[: len(batches) - len(batches) % world] if len(batches) >= world else batches * world
        return rows, batches[accelerator.process_index :: world]

    steps_per_epoch = len(epoch_plan(0)[1])
    total_steps = steps_per_epoch * sft.max_epochs
    model = backbone.model
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": sft.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=sft.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(sft.schedule, sft.warmup_steps, total_steps))
    distiller = None
    if sft.distill > 0:
        from genrec.train.distill import SASRecTeacher

        distiller = SASRecTeacher(teacher, codes, data.sid_ids, sft.distill_temperature).to(accelerator.device)
    trie_softmax = None
    if sft.sid_softmax == "trie":
        from genrec.model.sid_softmax import TrieSoftmax

        vocab_size = model.get_output_embeddings().weight.shape[0]
        trie_softmax = TrieSoftmax(trie, backbone.vocab, vocab_size).to(accelerator.device)
    loss_module = NextTokenLoss(model, sft.distill, sft.distill_temperature, trie_softmax)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    # Stepped once per optimizer step (accelerate's scheduler wrapper would step once per process).
    accelerator.register_for_checkpointing(scheduler)
    lm = accelerator.unwrap_model(loss_module).lm
    recommender = GenerativeRecommender(
        lm,
        backbone.tokenizer,
        backbone.vocab,
        trie.to(accelerator.device),
        codes,
        backbone.fmt,
        cfg.data.max_history,
        sft.sid_softmax,
    )
    valid = _valid_sample(dataset, sft.eval_users, cfg.seed)
    average = WeightAverage(lm, sft.ema_decay) if sft.ema_decay > 0 else None

    state = {
        "epoch": 0,
        "step": 0,
        "best": -1.0,
        "best_epoch": 0,
        "bad_evals": 0,
        "stop": None,
        "train_seconds": 0.0,
        "cpu_seconds": 0.0,
        "epoch_seconds": [],
        "tokens": 0,
        "curves": [],
    }
    checkpoint = _latest_checkpoint(work_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = read_json(checkpoint / "trainer_state.json")
        if average is not None:
            average.load_state_dict(torch.load(checkpoint / "ema.pt", map_location="cpu", weights_only=True))
        log.info("sft: resumed from %s (epoch %d)", checkpoint.name, state["epoch"])
    best_path = work_dir / "best.pt"

    while state["stop"] is None and state["epoch"] < sft.max_epochs:
        epoch = state["epoch"]
        mean_epoch = float(np.mean(state["epoch_seconds"])) if state["epoch_seconds"] else 0.0
        over = bool(sft.max_minutes and state["train_seconds"] + mean_epoch > 60 * sft.max_minutes)
        if broadcast_object_list([over])[0]:  # the main process's clock decides for all
            state["stop"] = "time_budget"
            break
        started, cpu_started = time.perf_counter(), time.process_time()
        for examples in sets:  # curriculum tasks (genrec.methods.gream) change their examples with the epoch
            if hasattr(examples, "set_epoch"):
                examples.set_epoch(epoch)
        rows, batches = epoch_plan(epoch)
        loss_module.train()
        loss_sum, label_count, tokens = 0.0, 0, 0
        bar = tqdm(
            batches,
            desc=f"sft epoch {epoch + 1}/{sft.max_epochs}",
            unit="batch",
            leave=False,
            disable=not accelerator.is_main_process,
        )
        for batch in bar:
            examples = [sets[s][i] for s, i in rows[batch]]
            inputs = collate(examples, backbone.fmt.pad_id, accelerator.device)
            if distiller is not None:
                inputs["distill"] = distiller.batch(examples, (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist())
            with accelerator.autocast():
                loss = loss_module(**inputs)
            accelerator.backward(loss)
            if sft.grad_clip > 0:
                accelerator.clip_grad_norm_(loss_module.parameters(), sft.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update(state["step"])
            n = int((inputs["labels"][:, 1:] != -100).sum())
            loss_sum, label_count = loss_sum + loss.item() * n, label_count + n
            tokens += int(inputs["attention_mask"].sum())
            state["step"] += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds = time.perf_counter() - started
        # CPU seconds of all processes: on a shared machine, tokens per CPU second do not depend on the load.
        cpu_seconds = time.process_time() - cpu_started
        totals = np.sum(
            np.asarray(gather_object([[loss_sum, label_count, tokens, cpu_seconds]]), dtype=np.float64), axis=0
        )
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            "loss": float(totals[0] / max(totals[1], 1)),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": round(float(totals[2]) / max(train_seconds, 1e-9), 1),
            "train_seconds": round(train_seconds, 2),
            "cpu_seconds": round(float(totals[3]), 2),
        }
        state["tokens"] += int(totals[2])
        state["train_seconds"] += train_seconds
        state["cpu_seconds"] += float(totals[3])
        if (epoch + 1) % sft.eval_every == 0 or epoch + 1 == sft.max_epochs:
            with average.swapped() if average is not None else nullcontext():
                row.update(_valid_metrics(recommender, valid, cfg, accelerator))
                better = row["valid_ndcg@10"] > state["best"]
                if better and accelerator.is_main_process:
                    _save_tensors(best_path, _trainable_state(lm))
            if better:
                state.update(best=row["valid_ndcg@10"], best_epoch=epoch + 1, bad_evals=0)
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= sft.patience:
                    state["stop"] = "early_stop"
        state["epoch"] = epoch + 1
        state["epoch_seconds"].append(time.perf_counter() - started)
        state["curves"].append(row)
        if state["stop"] is None and state["epoch"] == sft.max_epochs:
            state["stop"] = "max_epochs"
        _save_checkpoint(accelerator, work_dir, state, average)
        log.info("sft epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if on_epoch_end is not None:
            on_epoch_end(row, lm)

    if best_path.is_file():
        _load_trainable_state(lm, torch.load(best_path, map_location="cpu", weights_only=True))
    elif average is not None:  # stopped before any evaluation: the average is still what is kept
        average.copy_to_model()
    summary = {
        "best_valid_ndcg@10": state["best"],
        "best_valid_hr@10": next(
            (r["valid_hr@10"] for r in state["curves"] if r["epoch"] == state["best_epoch"]), None
        ),
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "steps": state["step"],
        "stop_reason": state["stop"] or "max_epochs",
        "train_seconds": round(state["train_seconds"], 1),
        "tokens_per_s": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "tokens_per_cpu_s": round(state["tokens"] / max(state["cpu_seconds"], 1e-9), 1),
        "params": params,
        "examples_per_epoch": {name: int(round(w * len(s))) for name, w, s in zip(task_names, weights, sets)},
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
    }
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        recommender.save(out_dir / "model")
        _write_curves(out_dir / "curves.jsonl", state["curves"])
        write_json(out_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


def _fingerprint(
    cfg: RunConfig, dataset: Dataset, codes: np.ndarray, item_texts: list[str], task_names, sasrec=None
) -> str:
    """What a checkpoint is only valid for: the config (bar the time budget, and keys added since at
    their default, as in the stage hash), the data it trains on and the SASRec it reads (teacher or
    item vectors), if any."""
    import hashlib

    from genrec.pipeline import drop_added_defaults

    data = hashlib.sha256(codes.tobytes())
    for seq in dataset.train_sequences():
        data.update(seq.tobytes() + b"|")
    data.update("\n".join(item_texts).encode())
    if sasrec is not None:
        for name, tensor in sorted(sasrec.state_dict().items()):
            data.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    sections = {"model": asdict(cfg.model), "sft": asdict(cfg.sft)}
    sections["sft"].pop("max_minutes")
    drop_added_defaults(sections)
    return config_hash(
        {
            "seed": cfg.seed,
            **sections,
            "max_history": cfg.data.max_history,
            "tasks": list(task_names),
            "data": data.hexdigest(),
        }
    )


def _reset_stale_work_dir(accelerator, work_dir: Path, fingerprint: str) -> None:
    """Empty ``work_dir`` when its checkpoints were made under another config or data, so nothing stale resumes."""
    marker = work_dir / "fingerprint.json"
    if accelerator.is_main_process:
        if marker.is_file() and read_json(marker).get("fingerprint") != fingerprint:
            log.warning("sft: %s holds checkpoints of another config or data; starting over", work_dir)
            for path in work_dir.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        write_json(marker, {"fingerprint": fingerprint})
    accelerator.wait_for_everyone()


def _check_codes(codes: np.ndarray, num_items: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"sid codes must be an integer array (num_items, levels), got {codes.dtype} {codes.shape}")
    if len(codes) != num_items:
        raise ValueError(f"sid codes cover {len(codes)} items but the dataset has {num_items}: rerun the 'sid' stage")
    return codes.astype(np.int64)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(tensors, tmp)
    tmp.replace(path)


def _write_curves(path: Path, curves: list[dict]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in curves))


def _save_checkpoint(accelerator, work_dir: Path, state: dict, average: WeightAverage | None = None) -> None:
    """A new ``checkpoint-<epoch>`` directory, then the ``latest.json`` pointer, then old ones removed."""
    name = f"checkpoint-{state['epoch']:04d}"
    path = work_dir / name
    accelerator.save_state(str(path), safe_serialization=False)
    if accelerator.is_main_process:
        if average is not None:
            _save_tensors(path / "ema.pt", average.state_dict())
        write_json(path / "trainer_state.json", state)
        write_json(work_dir / "latest.json", {"checkpoint": name})
        _write_curves(work_dir / "curves.jsonl", state["curves"])
        for old in work_dir.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def run(ctx) -> dict:
    import pandas as pd

    cfg = ctx.cfg
    dataset = Dataset.load(ctx.input("prepare"), cfg.data.max_history)
    codes_path = ctx.input("sid") / "codes.npy"
    try:
        codes = _check_codes(np.load(codes_path), dataset.num_items)
    except ValueError as exc:
        raise ValueError(f"{codes_path}: {exc}") from exc
    texts_path = ctx.input("text") / "items_text.parquet"
    texts = pd.read_parquet(texts_path)
    if not np.array_equal(texts["item_id"].to_numpy(), np.arange(dataset.num_items)):
        raise ValueError(f"{texts_path}: item_id must be 0..{dataset.num_items - 1} in order; rerun the 'text' stage")
    extra_tasks = {}
    if cfg.sft.tasks.get("interest2sid", 0) > 0:  # DeepInterestGR: the rldi stage's labelled prefix interests
        from genrec.tasks.interests import interest_task_builder

        prefix = pd.read_parquet(ctx.input("rldi") / "prefix_user_interests.parquet")
        extra_tasks["interest2sid"] = interest_task_builder(prefix)
    teacher = None
    from genrec.pipeline import needs_sasrec

    if needs_sasrec(cfg):  # the SASRec of the same run directory (genrec.pipeline.sft_inputs)
        from genrec.baselines.sasrec import SASRec

        teacher = SASRec.load(ctx.input("sasrec") / "model.pt")
    if cfg.model.layout == "items":  # one position per item, a SID depth head (genrec.model.item_layout)
        from genrec.train.item_sft import train_items

        return train_items(cfg, dataset, codes, ctx.out, ctx.work, sasrec=teacher)
    return train_sft(
        cfg,
        dataset,
        codes,
        texts["text"].astype(str).tolist(),
        ctx.out,
        ctx.work,
        extra_tasks=extra_tasks,
        teacher=teacher,
    )
