"""The epoch loop of the ID-based models (SASRec, DeepRec's TRM): early stopping, a time budget, resume.

:func:`fit_epochs` runs ``train_epoch(epoch) -> {metric: value}`` once per epoch, evaluates
``valid_score()`` (valid NDCG@10) every ``eval_every`` epochs and on the last, keeps the best
weights, stops after ``patience`` evaluations without improvement or past ``max_minutes``, and
writes ``work_dir/checkpoint.pt`` (weights, optimiser, state, best weights, torch RNG) after
every epoch through a temporary file and one rename. A killed run resumes from it exactly: the
caller's shuffle must depend on (seed, epoch) only, and dropout masks continue from the saved
RNG state.

With ``cfg.lr_drops`` > 0 (SASRecConfig and, for the item layout, SFTConfig have it), the first
``lr_drops`` times that patience runs out are plateaus, not stops: the best weights come back, the
learning rate is multiplied by ``lr_drop_factor``, and patience starts afresh (the optimiser keeps
its moments). The row of that epoch records the new rate as ``lr_cut_to``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("genrec")


def fit_epochs(
    name: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train_epoch: Callable[[int], dict],
    valid_score: Callable[[], float],
    cfg,
    work_dir: str | Path,
) -> list[dict]:
    """Train ``model`` in place (the best evaluated weights loaded at the end, eval mode); the curves.

    ``cfg`` has ``max_epochs``, ``eval_every``, ``patience`` and ``max_minutes`` (0 = no budget).
    Each row of the curves is ``{"epoch", **train_epoch(epoch), "valid_ndcg@10" when evaluated}``.
    """
    from tqdm import tqdm

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(work_dir) / "checkpoint.pt"
    state = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_evals": 0, "drops": 0, "curves": [], "seconds": 0.0}
    best_state = None
    if ckpt_path.is_file():
        blob = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        state, best_state = blob["state"], blob["best_model"]
        state.setdefault("drops", 0)  # checkpoints from before the plateau cut
        torch.set_rng_state(blob["rng"])  # dropout masks continue exactly where they stopped
        log.info("%s: resumed from epoch %d", name, state["epoch"])

    started = time.time() - state["seconds"]
    bar = tqdm(total=cfg.max_epochs, initial=state["epoch"], desc=name, unit="epoch")
    while state["epoch"] < cfg.max_epochs:
        epoch = state["epoch"]
        model.train()
        row = {"epoch": epoch + 1, **train_epoch(epoch)}
        state["epoch"] = epoch + 1
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.max_epochs:
            model.eval()
            score = valid_score()
            row["valid_ndcg@10"] = score
            if score > state["best"]:
                state.update(best=score, best_epoch=epoch + 1, bad_evals=0)
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                state["bad_evals"] += 1
        if state["bad_evals"] >= cfg.patience and state["drops"] < getattr(cfg, "lr_drops", 0):  # TRMConfig has none
            # A plateau: back to the best weights, the learning rate cut, patience afresh.
            state["drops"] += 1
            state["bad_evals"] = 0
            model.load_state_dict(best_state)
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_drop_factor
            row["lr_cut_to"] = opt.param_groups[0]["lr"]
            log.info(
                "%s: plateau at epoch %d: back to epoch %d's weights, learning rate x%g (cut %d of %d)",
                name,
                epoch + 1,
                state["best_epoch"],
                cfg.lr_drop_factor,
                state["drops"],
                cfg.lr_drops,
            )
        state["curves"].append(row)
        state["seconds"] = time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", best=f"{state['best']:.4f}")
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "state": state,
                "best_model": best_state,
                "rng": torch.get_rng_state(),
            },
            tmp,
        )
        tmp.replace(ckpt_path)
        if state["bad_evals"] >= cfg.patience:
            log.info(
                "%s: early stop at epoch %d (best valid ndcg@10 %.4f at %d)",
                name,
                epoch + 1,
                state["best"],
                state["best_epoch"],
            )
            break
        if cfg.max_minutes and state["seconds"] > 60 * cfg.max_minutes:
            log.info("%s: stopping at the %.1f-minute budget", name, cfg.max_minutes)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return state["curves"]


def valid_ndcg(score: Callable, examples, batch: int = 512) -> float:
    """NDCG@10 of ``score(histories) -> (B, N)`` on ``examples``, seen items excluded (the early-stopping metric)."""
    import numpy as np

    from genrec.eval.evaluate import topk_from_scores
    from genrec.eval.metrics import ndcg_at_k, target_ranks

    ranked = np.concatenate(
        [
            topk_from_scores(score(examples.histories[s : s + batch]), examples.seen[s : s + batch], 10, True)
            for s in range(0, len(examples), batch)
        ]
    )
    return ndcg_at_k(target_ranks(ranked, examples.targets), 10)
