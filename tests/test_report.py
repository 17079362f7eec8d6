"""The HTML/Markdown report over tiny run directories whose metrics come from the real evaluation harness."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_dataset_frames
from genrec.config import EvalConfig
from genrec.data.dataset import Dataset
from genrec.eval.evaluate import evaluate
from genrec.eval.report import load_run, render_markdown, write_report
from genrec.io import write_json
from genrec.sid.quality import code_usage

PNG = b"\x89PNG\r\n\x1a\n"


def popularity_ranker(dataset):
    counts = dataset.item_popularity().astype(np.float32)
    return lambda histories: np.tile(counts, (len(histories), 1))


def random_ranker(dataset, seed):
    rng = np.random.default_rng(seed)
    return lambda histories: rng.random((len(histories), dataset.num_items)).astype(np.float32)


def make_run(root, dataset, full: bool):
    """A run directory: stats and popularity always; with ``full``, every model, curves and SIDs too."""
    cfg = EvalConfig(ks=[1, 5, 10, 20], bootstrap=50, batch_size=16)
    write_json(
        root / "prepare" / "stats.json",
        {
            "source": "tiny test data",
            "users": dataset.num_users,
            "items": dataset.num_items,
            "interactions": 300,
            "avg_length": 8.5,
            "split": {"protocol": "loo"},
        },
    )
    write_json(
        root / "prepare" / "done.json",
        {
            "stage": "prepare",
            "seed": 1,
            "config": {"data": {"kcore": 5}},
            "summary": {"users": dataset.num_users},
            "seconds": 1.5,
        },
    )
    evaluate(popularity_ranker(dataset), dataset, cfg, root / "popularity" / "eval", model_name="popularity")
    if not full:
        return
    evaluate(random_ranker(dataset, 0), dataset, cfg, root / "sasrec" / "eval", model_name="sasrec")
    evaluate(random_ranker(dataset, 1), dataset, cfg, root / "eval", model_name="sft")
    evaluate(random_ranker(dataset, 2), dataset, cfg, root / "rl" / "eval", model_name="sft+rl")
    write_json(
        root / "sasrec" / "curves.json",
        [{"epoch": e, "loss": 5.0 - e / 4, **({"valid_ndcg@10": 0.01 * e} if e % 2 == 0 else {})} for e in range(1, 7)],
    )
    (root / "sft").mkdir()
    (root / "sft" / "curves.jsonl").write_text(
        "".join(
            json.dumps(
                {"epoch": e, "step": 10 * e, "loss": 3.0 / e, "valid_ndcg@10": 0.02 * e, "valid_hr@10": 0.05 * e}
            )
            + "\n"
            for e in range(1, 5)
        )
    )
    (root / "rl" / "rl_curves.jsonl").write_text(
        json.dumps({"step": 0, "valid_ndcg@10": 0.05})
        + "\n"
        + "".join(
            json.dumps({"step": s, "loss": 0.1, "reward": 0.1 * s, "reward_rank": 0.05 * s, "kl": 0.001}) + "\n"
            for s in range(1, 6)
        )
    )
    codes = np.stack([np.arange(dataset.num_items) % 4, np.arange(dataset.num_items) // 4 % 8], axis=1)
    (root / "sid").mkdir()
    np.save(root / "sid" / "codes.npy", codes)
    write_json(
        root / "sid" / "quality.json",
        {
            "quantizer": "rkmeans",
            "codebook_sizes": [4, 8],
            "collision_rate": 0.1,
            "recon_rel": 0.4,
            "usage": code_usage(codes, [4, 8]),
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Made once: ``a/run`` with everything, ``b/run`` with the popularity baseline only."""
    root = tmp_path_factory.mktemp("runs")
    dataset = Dataset(*make_dataset_frames(), max_history=5)
    make_run(root / "a" / "run", dataset, full=True)
    make_run(root / "b" / "run", dataset, full=False)
    return root / "a" / "run", root / "b" / "run"


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_a_partial_run_reports_what_it_has_and_what_is_missing(tmp_path, runs):
    run = runs[1]
    out = write_report([run], tmp_path / "report.html")
    page, md = out.read_text(), out.with_suffix(".md").read_text()

    metrics = json.loads((run / "popularity" / "eval" / "metrics.json").read_text())["test"]
    lo, hi = metrics["ci95"]["ndcg@10"]
    row = f"| popularity (baseline) | {metrics['users']} |"
    assert row in md and f"{metrics['ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}]" in md
    assert "sft/curves.jsonl not found: run the 'sft' stage" in md
    assert "sid/codes.npy not found: run the 'sid' stage" in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 1 and pngs[0].startswith(PNG)  # the metrics plot; curves and SIDs say they have no data
    assert page.count("(no data for:") == 2
    assert "prepare: resolved config (seed 1)" in page


def test_full_runs_and_their_comparison(tmp_path, runs):
    a, b = runs
    out = write_report([a, b], tmp_path / "cmp.html")
    page, md = out.read_text(), out.with_suffix(".md").read_text()

    assert "a/run" in md and "b/run" in md  # runs that share a directory name are told apart by their parent
    comparison = md.split("## Run")[0]
    assert comparison.count("| a/run |") == 4 and comparison.count("| b/run |") == 1
    pngs = embedded_pngs(page)
    # comparison; run a: metrics, curves, codebook; run b: metrics
    assert len(pngs) == 5 and all(p.startswith(PNG) for p in pngs)
    assert "| 0 | 4 | 4 | 1.000 |" in md  # SID level 0 uses all 4 codes
    assert "rl/eval/metrics.json not found" not in md.split("## Run b/run")[0]


def test_broken_files_are_reported_not_fatal(tmp_path, runs):
    run = shutil.copytree(runs[0], tmp_path / "broken")
    (run / "sasrec" / "curves.json").write_text("[{not json")
    (run / "sft" / "curves.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n{oops\n')
    data = load_run(run)
    assert "sasrec" not in data.curves and "sft" not in data.curves and "rl" in data.curves
    assert any(m.startswith("sasrec/curves.json could not be read") for m in data.missing)
    assert any("sft/curves.jsonl could not be read (line 2:" in m for m in data.missing)
    assert "Missing: sasrec/curves.json could not be read" in render_markdown([data], "r.html")


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(ValueError, match="must end in .html"):
        write_report([tmp_path], tmp_path / "r.txt")


def test_importing_the_report_stays_light():
    code = "import sys, genrec.eval.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
