"""SIGKILL in the middle of training, through the real ``genrec run`` in a subprocess.

The killed stage leaves no output directory, only its checkpoint in ``run_dir/.<stage>.work/``;
rerunning the same command resumes from it and ends with exactly the metrics, rankings and
weights of an uninterrupted run with the same seed. Also: a damaged file of a real stage is
reported corrupt by ``genrec status`` and redone by ``genrec run``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

torch = pytest.importorskip("torch")

from conftest import TINY_GENERATIVE, make_dataset_frames  # noqa: E402
from genrec.cli import main  # noqa: E402
from genrec.config import parse_overrides  # noqa: E402
from genrec.io import read_json  # noqa: E402

GENREC = [sys.executable, "-m", "genrec.cli"]
# One thread in every run: a kernel then sums in the same order in the killed, the resumed
# and the uninterrupted process, so their floats agree bit for bit.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
}
WAIT_S = 180  # bound on any one wait; a healthy run needs a few seconds
TIMING = ("seconds", "ms_per_user")  # the only fields of metrics.json that may differ between runs

SASREC = [
    "stages=[prepare, sasrec]",
    "sasrec.hidden_size=16",
    "sasrec.num_layers=1",
    "sasrec.num_heads=2",
    "sasrec.dropout=0.2",  # dropout masks come from the RNG state the checkpoint restores
    "sasrec.batch_size=16",
    "sasrec.max_epochs=60",  # about a second of training: the kill lands in the middle
    "sasrec.eval_every=5",
    "sasrec.patience=1000",
    "eval.ks=[1, 5, 10]",
    "eval.bootstrap=0",
]


def write_raw(directory: Path) -> Path:
    """The tiny dataset as raw csv tables (``data.format=csv``, ``data.name=tiny``)."""
    items, sequences = make_dataset_frames()
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        (user, items["raw_id"][item], t)
        for user, seq in zip(sequences["raw_user"], sequences["item_ids"])
        for t, item in enumerate(seq)
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(directory / "tiny.inter.csv", index=False)
    items.drop(columns="item_id").rename(columns={"raw_id": "item_id"}).to_csv(directory / "tiny.item.csv", index=False)
    return directory


def write_config(tmp_path: Path, run: str, *overrides: str) -> Path:
    """A YAML config for run_dir ``tmp_path/run`` reading the tiny raw data; ``overrides`` are key=value."""
    raw = tmp_path / "raw"
    if not raw.is_dir():
        write_raw(raw)
    tree = parse_overrides(
        [
            f"run_dir={tmp_path / run}",
            "seed=3",
            "data.format=csv",
            f"data.path={raw}",
            "data.name=tiny",
            "data.kcore=0",
            "data.max_history=5",
            *overrides,
        ]
    )
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def start(config: Path, log: Path) -> subprocess.Popen:
    """``genrec run config`` in a subprocess, its output going to ``log`` (a pipe nobody reads would fill up)."""
    with open(log, "w") as out:
        return subprocess.Popen([*GENREC, "run", str(config)], env=ENV, stdout=out, stderr=subprocess.STDOUT)


def finish(child: subprocess.Popen, log: Path) -> str:
    """Wait for a run started by :func:`start`; its output, after checking that it succeeded."""
    try:
        child.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail(f"genrec run did not finish in {WAIT_S}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert child.returncode == 0, f"genrec run failed ({child.returncode}):\n{text[-3000:]}"
    return text


def sasrec_epochs(work: Path) -> int:
    """Epochs recorded in SASRec's checkpoint (0 while there is none)."""
    try:
        return torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]["epoch"]
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0


def sft_epochs(work: Path) -> int:
    """Epochs recorded in the SFT checkpoint that ``latest.json`` names (0 while there is none)."""
    try:
        return read_json(work / read_json(work / "latest.json")["checkpoint"] / "trainer_state.json")["epoch"]
    except (OSError, ValueError, KeyError):  # not written yet, or replaced by the next one meanwhile
        return 0


def kill_mid_training(config: Path, work: Path, epochs_done: Callable[[Path], int], log: Path) -> int:
    """Start ``genrec run config``, SIGKILL it once its checkpoint records an epoch; return the epochs recorded."""
    child = start(config, log)
    try:
        deadline = time.monotonic() + WAIT_S
        while epochs_done(work) < 1:
            if child.poll() is not None:
                pytest.fail(f"genrec run exited ({child.returncode}) before a checkpoint:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint with a finished epoch in {work} after {WAIT_S}s")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT_S)
    assert child.returncode == -signal.SIGKILL, "training finished before the kill: give it more epochs"
    return epochs_done(work)


def metric_values(path: Path) -> dict:
    """The metrics of ``metrics.json`` per split, without the timing fields."""
    metrics = read_json(path)
    return {split: {k: v for k, v in metrics[split].items() if k not in TIMING} for split in ("valid", "test")}


def assert_same_evaluation(a: Path, b: Path) -> None:
    """Identical metrics (bar timing) and identical top-20 lists in two ``eval/`` directories."""
    assert metric_values(a / "metrics.json") == metric_values(b / "metrics.json")
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "predictions.parquet"), pd.read_parquet(b / "predictions.parquet")
    )


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def kill_resume_and_compare(tmp_path: Path, stage: str, epochs_done, max_epochs: int, *overrides: str) -> tuple:
    """Kill run ``killed`` mid-``stage`` and resume it, while ``straight`` runs uninterrupted; return both run dirs."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    config = write_config(tmp_path, "killed", *overrides)
    # The two runs share nothing but the raw data (and the content-addressed embedding cache),
    # so the uninterrupted one runs alongside, which halves the wall time.
    uninterrupted = start(write_config(tmp_path, "straight", *overrides), tmp_path / "straight.log")
    try:
        work = killed / f".{stage}.work"
        done = kill_mid_training(config, work, epochs_done, tmp_path / "killed.log")
        assert 1 <= done < max_epochs, f"the kill landed after epoch {done} of {max_epochs}"
        assert not (killed / stage).exists() and work.is_dir()
        assert "resumed from" in finish(start(config, tmp_path / "resumed.log"), tmp_path / "resumed.log")
        assert not work.exists()
    finally:
        finish(uninterrupted, tmp_path / "straight.log")
    for run in (killed, straight):
        assert read_json(run / stage / "done.json")["summary"]["epochs"] == max_epochs
    return killed, straight


@pytest.mark.slow
def test_sasrec_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    killed, straight = kill_resume_and_compare(tmp_path, "sasrec", sasrec_epochs, 60, *SASREC)
    assert_same_evaluation(killed / "sasrec" / "eval", straight / "sasrec" / "eval")
    assert read_json(killed / "sasrec" / "curves.json") == read_json(straight / "sasrec" / "curves.json")
    weights = [torch.load(run / "sasrec" / "model.pt", weights_only=False)["state_dict"] for run in (killed, straight)]
    assert_same_tensors(*weights)


@pytest.mark.slow
def test_sft_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    from safetensors.torch import load_file

    from test_model import save_tiny_pretrained

    # A tiny causal LM as the text encoder: the embed stage takes a second instead of MiniLM's several.
    save_tiny_pretrained(tmp_path / "encoder", tied=True)
    killed, straight = kill_resume_and_compare(
        tmp_path,
        "sft",
        sft_epochs,
        20,
        *TINY_GENERATIVE,
        "stages=[prepare, text, embed, sid, sft, eval]",
        f"embed.encoder=lm:{tmp_path / 'encoder'}",
        "embed.device=cpu",
        "sid.codebook_size=4",
        "sid.pca_dim=8",
        "sid.kmeans_iters=10",
        "model.dropout=0.2",
        "sft.tasks={seqrec: 1.0, item2sid: 0.5}",  # item2sid at 0.5 draws a fresh half every epoch
        "sft.max_epochs=20",
        "sft.patience=1000",
        "eval.ks=[1, 5, 10]",
    )
    assert_same_evaluation(killed / "eval", straight / "eval")
    a, b = (load_file(run / "sft" / "model" / "model.safetensors") for run in (killed, straight))
    assert_same_tensors(a, b)

    def curves(run: Path) -> list[dict]:
        rows = [json.loads(r) for r in (run / "sft" / "curves.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_seconds", "cpu_seconds")} for r in rows]

    assert curves(killed) == curves(straight) and len(curves(killed)) == 20


def statuses(config: Path, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert main(["status", str(config)]) == 0
    return dict(line.split() for line in capsys.readouterr().out.splitlines() if line.strip())


def test_a_truncated_sasrec_model_is_reported_corrupt_and_redone(tmp_path, capsys):
    config = write_config(tmp_path, "run", *SASREC, "sasrec.max_epochs=3", "sasrec.eval_every=1")
    assert main(["run", str(config)]) == 0
    model = tmp_path / "run" / "sasrec" / "model.pt"
    before = torch.load(model, weights_only=False)["state_dict"]
    prepared = read_json(tmp_path / "run" / "prepare" / "done.json")
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert {k: v for k, v in statuses(config, capsys).items() if k in ("prepare", "sasrec")} == {
        "prepare": "done",
        "sasrec": "corrupt",
    }

    assert main(["run", str(config)]) == 0
    assert statuses(config, capsys)["sasrec"] == "done"
    assert_same_tensors(torch.load(model, weights_only=False)["state_dict"], before)
    assert read_json(tmp_path / "run" / "prepare" / "done.json") == prepared  # the intact stage was not redone
