"""Stages, the run directory and ``genrec run``.

A stage is a function ``run(ctx: StageContext) -> dict`` that reads the outputs of the
stages it names as inputs and writes its own files into ``ctx.out``. The runner gives it
a fresh temporary directory, and only when the function returns does it write
``done.json`` (the resolved config of the sections the stage reads, a hash of its
inputs, a SHA-256 of every file it wrote and the summary it returned) and move the
directory into place with one ``rename``. So a killed stage leaves no half-written
output; long stages keep resumable state (checkpoints) in ``ctx.work``, which survives a
kill. A rerun skips a stage whose config, inputs and files are unchanged, and redoes one
whose files no longer match their checksums.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genrec.config import SASREC_ITEM_EMBEDDINGS, RunConfig, config_hash, to_dict
from genrec.io import read_json, sha256_file, write_json

log = logging.getLogger("genrec")

# Config keys added after runs were made with the behaviour of their default: at that default
# they stay out of every stage's config hash, so a finished stage from before the key existed
# is still finished. Any other value enters the hash as usual.
ADDED_KEYS: dict[str, Any] = {
    "model.item_dropout": 0.0,
    "model.item_embedding": "none",
    "model.layout": "tokens",
    "rl.scale_rewards": "group",
    "rl.prompts": "targets",
    "sasrec.lr_drops": 0,
    "sasrec.lr_drop_factor": 0.1,
    "sft.distill": 0.0,
    "sft.batch_size": 256,
    "sft.lr_drops": 0,
    "sft.lr_drop_factor": 0.1,
    "sft.distill_temperature": 1.0,
    "sft.sid_softmax": "vocab",
    "sid.embedding": "text",
}


@dataclass(frozen=True)
class Stage:
    name: str
    # "module:function" imported lazily, so `genrec --help` stays light.
    target: str
    # Config sections the stage reads (they enter its config hash).
    sections: tuple[str, ...]
    # Stages whose outputs it reads (their file hashes enter its input hash).
    inputs: tuple[str, ...] = ()
    help: str = ""
    # More inputs that depend on the config (cfg -> stage names), e.g. the stages whose
    # outputs the configured RL rewards read; they count like ``inputs`` (see stage_inputs).
    config_inputs: Callable[[RunConfig], tuple[str, ...]] | None = None
    # "section.key" entries of its sections that the stage does not read: they stay out of its
    # config hash, so changing them does not redo it (training validates on valid whatever
    # eval.splits says).
    ignore: tuple[str, ...] = ()


def reward_inputs(cfg: RunConfig) -> tuple[str, ...]:
    """The stages whose outputs the rewards named in ``rl.rewards`` read (``genrec.train.rewards.REWARD_INPUTS``)."""
    from genrec.train.rewards import REWARD_INPUTS

    return tuple(dict.fromkeys(REWARD_INPUTS[name] for name in cfg.rl.rewards if name in REWARD_INPUTS))


def text_inputs(cfg: RunConfig) -> tuple[str, ...]:
    """IEID: the interest stages whose item interests ``text.interests`` folds into the item texts."""
    return {"all": ("interests",), "positive": ("interests", "rldi")}.get(cfg.text.interests, ())


def sft_inputs(cfg: RunConfig) -> tuple[str, ...]:
    """``rldi`` when ``sft.tasks`` trains ``interest2sid`` (it reads the labelled prefix interests),
    ``sasrec`` when ``sft.distill`` > 0 (the teacher) or ``model.item_embedding`` reads SASRec."""
    extra = ("rldi",) if cfg.sft.tasks.get("interest2sid", 0) > 0 else ()
    return extra + (("sasrec",) if needs_sasrec(cfg) else ())


def needs_sasrec(cfg: RunConfig) -> bool:
    """Whether SFT reads the run's SASRec: as the teacher, or for its item embeddings."""
    return cfg.sft.distill > 0 or cfg.model.item_embedding in SASREC_ITEM_EMBEDDINGS


def sid_inputs(cfg: RunConfig) -> tuple[str, ...]:
    """``sasrec`` when ``sid.embedding`` quantises its item embeddings."""
    return ("sasrec",) if "sasrec" in cfg.sid.embedding.split("+") else ()


def stage_inputs(stage: Stage, cfg: RunConfig) -> tuple[str, ...]:
    """Every stage whose outputs ``stage`` reads under ``cfg``: they run first and their files enter its input hash."""
    extra = stage.config_inputs(cfg) if stage.config_inputs is not None else ()
    return tuple(dict.fromkeys([*stage.inputs, *extra]))


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("prepare", "genrec.data.prepare:run", ("data",), (), "read raw data, k-core, order, split, statistics"),
        Stage("popularity", "genrec.baselines.popularity:run", ("eval",), ("prepare",), "most-popular baseline"),
        Stage(
            "sasrec", "genrec.baselines.sasrec:run", ("data", "sasrec", "eval"), ("prepare",), "SASRec, full-softmax CE"
        ),
        Stage(
            "interests",
            "genrec.interests.miner:run",
            ("interests",),
            ("prepare",),
            "mine user and item interests with LLMs or the offline miner",
        ),
        Stage(
            "rldi",
            "genrec.interests.rldi:run",
            ("data", "interests", "rldi"),
            ("prepare", "interests"),
            "label mined interests positive/negative with a classifier over embeddings",
        ),
        Stage("text", "genrec.text.compose:run", ("text",), ("prepare",), "compose each item's text", text_inputs),
        Stage("embed", "genrec.text.encode:run", ("embed",), ("text",), "embed item texts"),
        Stage(
            "sid",
            "genrec.sid.stage:run",
            ("sid",),
            ("embed", "prepare"),
            "quantise embeddings into Semantic IDs",
            sid_inputs,
        ),
        Stage(
            "trm",
            "genrec.agent.trm:run",
            ("data", "trm", "embed", "eval"),
            ("prepare", "embed"),
            "DeepRec's preference-aware TRM (the agent's retrieval tool)",
        ),
        Stage(
            "sft",
            "genrec.train.sft:run",
            ("data", "model", "sft", "decode", "eval"),
            ("prepare", "sid", "text"),
            "multi-task SFT of the generative recommender",
            sft_inputs,
            ignore=("eval.splits",),
        ),
        Stage(
            "eval",
            "genrec.eval.generative:run",
            ("data", "decode", "eval"),
            ("prepare", "sid", "sft"),
            "evaluate the SFT model with constrained beam search",
        ),
        Stage(
            "rl",
            "genrec.train.rl:run",
            ("data", "rl", "decode", "eval"),
            ("prepare", "sid", "sft"),
            "GRPO-family RL from the SFT checkpoint",
            reward_inputs,
        ),
        Stage(
            "gream_sft",
            "genrec.methods.gream.stage:run_sft",
            ("data", "model", "sft", "decode", "eval", "gream", "interests"),
            ("prepare", "sid", "text"),
            "GREAM: alignment tasks + reasoning curriculum SFT",
            ignore=("eval.splits",),
        ),
        Stage(
            "gream_eval",
            "genrec.methods.gream.stage:run_eval",
            ("data", "decode", "eval", "gream"),
            ("prepare", "sid", "gream_sft"),
            "GREAM: evaluate direct and reasoning modes",
        ),
        Stage(
            "gream_rl",
            "genrec.methods.gream.stage:run_rl",
            ("data", "rl", "decode", "eval", "gream"),
            ("prepare", "sid", "gream_sft"),
            "GREAM: SRPO (RSVR reward + BGAE advantage)",
            reward_inputs,
        ),
        Stage(
            "agent_sft",
            "genrec.agent.stage:run_sft",
            ("data", "model", "sft", "decode", "eval", "agent"),
            ("prepare", "sid", "text", "embed", "trm"),
            "DeepRec: warm-up SFT on trajectories made with the TRM",
            ignore=("eval.splits",),
        ),
        Stage(
            "agent_eval",
            "genrec.agent.stage:run_eval",
            ("data", "decode", "eval", "agent"),
            ("prepare", "sid", "embed", "trm", "agent_sft"),
            "DeepRec: evaluate the agent mode (and the direct mode of the same model)",
        ),
        Stage(
            "agent_rl",
            "genrec.agent.stage:run_rl",
            ("data", "rl", "decode", "eval", "agent"),
            ("prepare", "sid", "embed", "trm", "agent_sft"),
            "DeepRec: two-stage RL on hierarchical rewards, then both modes",
        ),
    ]
}


@dataclass
class StageContext:
    cfg: RunConfig
    run_dir: Path
    stage: Stage
    # Temporary output directory, renamed to run_dir/<stage> on success.
    out: Path
    # Persistent scratch directory for checkpoints; removed after success.
    work: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> Path:
        """The finished output directory of an upstream stage."""
        path = self.run_dir / name
        if not (path / "done.json").is_file():
            raise FileNotFoundError(
                f"stage {self.stage.name!r} needs stage {name!r}, which has not run in {self.run_dir}"
            )
        return path

    @property
    def seed(self) -> int:
        return self.cfg.seed


def drop_added_defaults(sections: dict[str, dict]) -> None:
    """Remove, in place, every ``ADDED_KEYS`` entry of these config sections that is at its default."""
    for entry, default in ADDED_KEYS.items():
        section, key = entry.split(".", 1)
        if section in sections and sections[section].get(key, default) == default:
            sections[section].pop(key, None)


def _stage_record(cfg: RunConfig, stage: Stage, run_dir: Path) -> dict:
    sections = {s: to_dict(getattr(cfg, s)) for s in stage.sections}
    for entry in stage.ignore:
        section, key = entry.split(".", 1)
        sections[section].pop(key, None)
    drop_added_defaults(sections)
    inputs = {}
    for name in stage_inputs(stage, cfg):
        done = run_dir / name / "done.json"
        inputs[name] = read_json(done)["files_hash"] if done.is_file() else None
    return {
        "stage": stage.name,
        "seed": cfg.seed,
        "config": sections,
        "config_hash": config_hash({"seed": cfg.seed, **sections}),
        "input_hash": config_hash(inputs),
    }


def _work_key(record: dict) -> str:
    """What a stage's resumable state belongs to: its seed, config sections and inputs, except
    the wall-clock budgets (``max_minutes``), so that a killed run can be given more time."""
    sections = {s: {k: v for k, v in c.items() if k != "max_minutes"} for s, c in record["config"].items()}
    return config_hash({"seed": record["seed"], "config": sections, "inputs": record["input_hash"]})


def _claim_work_dir(work: Path, record: dict, name: str) -> None:
    """Empty ``work`` when its checkpoints were made under another config or other inputs.

    A killed run resumes from ``work`` only when nothing it depends on changed; otherwise the
    stage would continue, say, RL with the old rewards from the old SFT model.
    """
    key_file = work / "stage_key.json"
    key = _work_key(record)
    if key_file.is_file() and read_json(key_file).get("key") != key:
        log.info("stage %-10s: its checkpoints in %s are from another config or inputs; starting over", name, work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not key_file.is_file():
        write_json(key_file, {"key": key})


def _files_of(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "done.json"
    }


def stage_status(cfg: RunConfig, name: str) -> str:
    """'done' (up to date and intact), 'stale' (config or inputs changed), 'corrupt' or 'missing'."""
    stage = STAGES[name]
    run_dir = Path(cfg.run_dir)
    done_path = run_dir / name / "done.json"
    if not done_path.is_file():
        return "missing"
    try:
        done = read_json(done_path)
    except ValueError:
        return "corrupt"
    want = _stage_record(cfg, stage, run_dir)
    if done.get("config_hash") != want["config_hash"] or done.get("input_hash") != want["input_hash"]:
        return "stale"
    files = done.get("files", {})
    for rel, digest in files.items():
        path = run_dir / name / rel
        if not path.is_file() or sha256_file(path) != digest:
            log.warning("stage %s: %s is missing or does not match its checksum; the stage reruns", name, rel)
            return "corrupt"
    return "done"


def load_stage_fn(stage: Stage) -> Callable[[StageContext], dict]:
    module, fn = stage.target.split(":")
    return getattr(importlib.import_module(module), fn)


def run_stage(cfg: RunConfig, name: str, force: bool = False) -> dict:
    """Run one stage unless it is already done; return its done.json record."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    run_dir = Path(cfg.run_dir)
    final = run_dir / name
    status = stage_status(cfg, name)
    if status == "done" and not force:
        log.info("stage %-10s up to date, skipped", name)
        return read_json(final / "done.json")
    for dep in stage_inputs(stage, cfg):
        if stage_status(cfg, dep) != "done":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise RuntimeError(f"stage {name!r} needs {dep!r}: run it in one process before launching several")
            run_stage(cfg, dep)
    record = _stage_record(cfg, stage, run_dir)
    tmp = run_dir / f".{name}.tmp"
    work = run_dir / f".{name}.work"
    # Under `accelerate launch` / torchrun every process runs the stage function (training
    # is data-parallel inside it), but only rank 0 keeps the books and moves the output.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _claim_work_dir(work, record, name)
        write_json(run_dir / "config.json", to_dict(cfg))
    work.mkdir(parents=True, exist_ok=True)
    log.info("stage %-10s running (%s)", name, stage.help)
    started = time.time()
    fn = load_stage_fn(stage)
    summary = fn(StageContext(cfg=cfg, run_dir=run_dir, stage=stage, out=tmp, work=work)) or {}
    if rank != 0:
        return record
    files = _files_of(tmp)
    record.update(
        files=files,
        files_hash=config_hash(files),
        summary=summary,
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        seconds=round(time.time() - started, 2),
    )
    write_json(tmp / "done.json", record)
    # Swap in the finished directory: remove the old one first, then one rename.
    if final.exists():
        trash = run_dir / f".{name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    log.info("stage %-10s done in %.1fs", name, record["seconds"])
    return record


def run_pipeline(cfg: RunConfig, force: list[str] | None = None) -> dict[str, dict]:
    """Run ``cfg.stages`` in order; ``force`` names stages to redo even if up to date."""
    unknown = [s for s in [*cfg.stages, *(force or [])] if s not in STAGES]
    if unknown:
        raise KeyError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return {name: run_stage(cfg, name, force=name in (force or [])) for name in cfg.stages}
