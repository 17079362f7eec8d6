"""The resumable state of an RL loop, shared by genrec's three RL trainers.

``genrec.train.rl.train_rl`` (SID rollouts), ``genrec.methods.gream.srpo`` (reasoning rollouts)
and ``genrec.agent.rl`` (multi-turn agent rollouts) roll out and score in their own ways, and
keep their progress in one way, through :class:`RLRun`:

- ``work_dir/checkpoint.pt``: model, optimiser, loop state and RNG state, written atomically
  when the trainer asks (every ``save_every`` steps and at the end); a killed run resumes there;
- ``work_dir/best_model.pt``: the weights of the best valid NDCG@10 so far, the input model
  being step 0, so the stage never returns a model worse on valid than the one it started from;
- ``work_dir/<curves>``: one JSON row per step, appended; a resumed run drops the rows after
  its checkpoint, which it is about to write again;
- at the end (:meth:`RLRun.finish`): ``out_dir/model`` with the best weights, the curves, their
  plot and ``rl_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from genrec.io import atomic_write_text, write_json

log = logging.getLogger("genrec")


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and one rename, so a kill leaves the old file or the new."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_curves(path: Path, upto_step: int) -> list[dict]:
    """Rows of a curves file up to and including ``upto_step`` (a resumed run drops later rows)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def plot_curves(rows: list[dict], path: Path) -> None:
    """Rewards, rollout hit rate, KL, clip fraction, loss and valid NDCG@10 against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if "loss" in r]
    panels = [
        ("reward", [k for k in (rows[-1] if rows else {}) if k.startswith("reward")]),
        ("rollout hit rate", ["hit_rate"]),
        ("KL to reference (k3)", ["kl"]),
        ("clip fraction", ["clip_frac"]),
        ("loss", ["loss"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows if "loss" in r], label=key, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    evals = [r for r in rows if "valid_ndcg@10" in r]
    ax = axes.flat[5]
    ax.plot([r["step"] for r in evals], [r["valid_ndcg@10"] for r in evals], marker="o")
    ax.set_title("valid NDCG@10")
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RLRun:
    """Step counter, best valid score and weights, curves and timing of one RL stage (see the module docstring).

    ``evaluate`` returns the model's valid NDCG@10. Constructing the run resumes from
    ``work_dir/checkpoint.pt`` when there is one, and otherwise evaluates the input model as
    step 0. A trainer's loop then is::

        while run.step < steps:
            step = run.step + 1
            ...  # roll out, score, update
            over = run.over_budget(max_minutes)
            run.end_step({"step": step, ...}, evaluate=step % eval_every == 0 or over, save=True)
            if over:
                break
        return run.finish(recommender, out_dir)
    """

    def __init__(
        self,
        name: str,
        model,
        opt,
        work_dir: str | Path,
        evaluate: Callable[[], float],
        curves_name: str = "rl_curves.jsonl",
    ):
        import torch

        self.name, self.model, self.opt, self.evaluate = name, model, opt, evaluate
        self.curves_name = curves_name
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.work_dir / "checkpoint.pt"
        self.best_path = self.work_dir / "best_model.pt"
        self.curves_path = self.work_dir / curves_name
        self.state = {"step": 0, "best": -1.0, "best_step": -1, "seconds": 0.0, "sft_valid_ndcg@10": None}
        if self.ckpt_path.is_file():
            blob = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            model.load_state_dict(blob["model"])
            opt.load_state_dict(blob["opt"])
            self.state = {"sft_valid_ndcg@10": None, **blob["state"]}
            if "best" in blob and not self.best_path.is_file():  # a checkpoint that held its best weights
                save_torch(blob["best"], self.best_path)
            set_rng_state(blob["rng"])
            log.info("%s: resumed from step %d", name, self.state["step"])
        self.rows = read_curves(self.curves_path, self.state["step"])
        atomic_write_text(self.curves_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.started = time.time() - self.state["seconds"]
        if self.state["step"] == 0 and self.state["sft_valid_ndcg@10"] is None:
            self.append_row({"step": 0, "valid_ndcg@10": self.evaluate_and_keep(0)})
            self.checkpoint()

    @property
    def step(self) -> int:
        """Steps done (0 before the first update)."""
        return self.state["step"]

    @property
    def best(self) -> float:
        return self.state["best"]

    def over_budget(self, max_minutes: float) -> bool:
        """Whether the stage has run longer than ``max_minutes`` (0: no budget), resumed time included."""
        return max_minutes > 0 and time.time() - self.started > 60 * max_minutes

    def evaluate_and_keep(self, step: int) -> float:
        """Valid NDCG@10 now; the weights are saved as the best when it beats every earlier score."""
        score = float(self.evaluate())
        self.model.eval()
        if self.state["sft_valid_ndcg@10"] is None:
            self.state["sft_valid_ndcg@10"] = score
        if score > self.state["best"] or not self.best_path.is_file():  # step 0 is kept whatever it scores
            self.state.update(best=score, best_step=step)
            save_torch(self.model.state_dict(), self.best_path)
        return score

    def append_row(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.curves_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(self) -> None:
        blob = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "state": self.state, "rng": rng_state()}
        save_torch(blob, self.ckpt_path)

    def end_step(self, row: dict, evaluate: bool, save: bool) -> None:
        """Record step ``row["step"]`` as done: evaluate (into the row) if asked, time it, log it, checkpoint if asked."""
        self.state["step"] = row["step"]
        if evaluate:
            row["valid_ndcg@10"] = self.evaluate_and_keep(row["step"])
        self.state["seconds"] = time.time() - self.started
        row["seconds"] = round(self.state["seconds"], 2)
        self.append_row(row)
        if save:
            self.checkpoint()

    def finish(self, recommender, out_dir: str | Path, **extra) -> dict:
        """Load the best weights into the model, save it to ``out_dir/model`` with the curves; return the summary."""
        import torch

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.load_state_dict(torch.load(self.best_path, map_location="cpu", weights_only=True))
        self.model.eval()
        recommender.save(out_dir / "model")
        atomic_write_text(out_dir / self.curves_name, "".join(json.dumps(r) + "\n" for r in self.rows))
        plot_curves(self.rows, out_dir / Path(self.curves_name).with_suffix(".png"))
        summary = {
            **extra,
            "sft_valid_ndcg@10": self.state["sft_valid_ndcg@10"],
            "best_valid_ndcg@10": self.state["best"],
            "best_step": self.state["best_step"],
            "steps": self.state["step"],
            "train_seconds": round(self.state["seconds"], 1),
        }
        write_json(out_dir / "rl_summary.json", summary)
        return summary
