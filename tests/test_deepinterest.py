"""DeepInterestGR end to end: IEID text, the interest2sid task, the RL columns, the benchmark's rows, a full tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_GENERATIVE, load_bench, make_dataset_frames
from genrec.config import load_config, to_dict
from genrec.tasks.interests import Interest2SIDTask, interest_examples
from genrec.text.compose import compose_texts, fold_interests

ROOT = Path(__file__).resolve().parents[1]


def test_ieid_folds_only_positive_interests_into_the_text():
    items = pd.DataFrame({"item_id": [0, 1], "raw_id": ["a", "b"], "title": ["Rose balm", "Hair oil"]})
    mined = pd.DataFrame(
        {
            "item_id": [0, 0, 0, 1],
            "rank": [2, 0, 1, 0],
            "interest": ["gifts", "lip care", "Acme products", "scalp care"],
            "label": [True, True, False, False],
        }
    )
    texts, _ = compose_texts(fold_interests(items, mined, "positive"), "default")
    assert texts == ["Rose balm. Interests: lip care; gifts.", "Hair oil."]
    texts, _ = compose_texts(fold_interests(items, mined, "all"), "default")
    assert texts[0] == "Rose balm. Interests: lip care; Acme products; gifts."


class _Tok:
    """Each character is one token id (its code point)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_interest2sid_uses_prefix_interests_for_later_targets_only():
    from genrec.model.prompt import PromptFormat
    from genrec.tasks.base import TaskData

    train = [np.array([0, 1, 2, 3, 4]), np.array([2, 3, 4])]
    sid = np.arange(5)[:, None] * 10 + np.array([1000, 1001])  # (N, 2) distinct ids
    data = TaskData(train, sid, ["t"] * 5, ["t"] * 5, _Tok(), max_history=2)
    fmt = PromptFormat("markers", {"seqrec": [1, 2], "interest2sid": [1, 3]}, [5], [6], 7, 0)
    prefix = pd.DataFrame(
        {
            "user_id": [0, 0, 1],
            "rank": [0, 1, 0],
            "interest": ["ab", "c", "z"],
            "label": [True, True, False],
            "prefix_end": [3, 3, 1],
        }
    )
    rows, phrases = interest_examples(train, prefix)
    assert rows.tolist() == [[0, 3], [0, 4]] and phrases == {0: ["ab", "c"]}  # user 1: no positive interest
    task = Interest2SIDTask(data, fmt, prefix)
    ex = task[1]  # user 0, target position 4 (item 4), history items 2, 3
    want = [1, 3, ord("a"), ord("b"), 6, ord("c"), 6, 1020, 1021, 1030, 1031, 5, 1040, 1041]
    assert ex.input_ids.tolist() == want and ex.user == 0
    assert ex.labels.tolist() == [-100] * 12 + [1040, 1041]
    assert task.lengths.tolist() == [len(task[0].input_ids), len(want)]


def test_rl_stage_columns_read_the_rldi_outputs(tmp_path):
    from types import SimpleNamespace

    from genrec.train.rewards import combine_rewards
    from genrec.train.rl import stage_columns

    (tmp_path / "rldi").mkdir()
    (tmp_path / "rldi" / "done.json").write_text("{}")
    np.save(tmp_path / "rldi" / "user_interest_emb.npy", np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.save(tmp_path / "rldi" / "item_interest_emb.npy", np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    np.save(tmp_path / "rldi" / "item_quality.npy", np.array([0.5, 1.0, 0.0]))
    cfg = load_config(None, ["run_dir=x", "rl.rewards={interest: 1.0, quality: 1.0}"])
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, input=lambda name: tmp_path / name)
    columns = stage_columns(ctx)
    user_ids = np.array([1, 0])  # the column follows each prompt's user, not its text
    columns["user_interest_emb"] = columns["user_interest_emb"](user_ids=user_ids, histories=None, target_item=None)
    items = np.array([[0, 1, 2], [0, 1, 2]])
    batch = dict(items=items, target_item=np.array([1, 0]), valid=items >= 0, **columns)
    total, parts = combine_rewards(cfg.rl.rewards, batch)
    assert np.round(parts["interest"], 4).tolist() == [[0.0, 1.0, 0.7071], [1.0, 0.0, 0.7071]]
    assert parts["quality"].tolist() == [[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]]


def fake_metrics(path: Path, hr5: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    test = {"hr@5": hr5, "ndcg@5": hr5 / 2, "hr@10": hr5 * 2, "ndcg@10": hr5}
    (path / "metrics.json").write_text(json.dumps({"test": test, "valid": test}))


def test_bench_rows_come_from_the_right_variant_and_model(tmp_path):
    bench = load_bench("bench_deepinterest")
    for s, bump in ((1, 0.0), (2, 0.02)):
        full = tmp_path / "full" / f"seed_{s}"
        fake_metrics(full / "eval", 0.10 + bump)
        fake_metrics(full / "rl" / "eval", 0.12 + bump)
        fake_metrics(full / "sasrec" / "eval", 0.20 + bump)
        fake_metrics(tmp_path / "no-mlim" / f"seed_{s}" / "rl" / "eval", 0.05 + bump)
        (full / "rldi").mkdir()
        (full / "rldi" / "rldi.json").write_text(json.dumps({"heldout_accuracy": 0.7, "heldout_auc": 0.6 + bump}))
    fake_metrics(tmp_path / "no-ieid" / "seed_1" / "rl" / "eval", 0.30)  # only one seed ran
    rows = bench.ablation_rows(tmp_path, [1, 2])
    assert list(rows) == ["SASRec (CE)", "DeepInterestGR (full)", "without MLIM", "without IEID", "without RL"]
    assert rows["DeepInterestGR (full)"]["hr@5"]["values"] == pytest.approx([0.12, 0.14])
    assert rows["without RL"]["hr@5"]["values"] == pytest.approx([0.10, 0.12])
    assert rows["without MLIM"]["hr@5"]["mean"] == pytest.approx(0.06)
    assert rows["without IEID"]["hr@5"]["n"] == 1
    section = bench.dataset_section("ml-100k", tmp_path, [1, 2], "python bench/bench_deepinterest.py", 60.0)
    assert "| DeepInterestGR (full) | 2 | 0.1300 ± 0.0141 |" in section
    assert "heldout_auc 0.6100 ± 0.0141" in section and "without RLDI" not in section


def test_bench_keeps_the_other_datasets_sections(tmp_path):
    """Results files whose headings are ``### name`` alone or ``### name: stats`` both split by dataset."""
    baselines = load_bench("bench_baselines")
    results = tmp_path / "r.md"
    results.write_text("# T\n\n### ml-100k\n\nCommand: `a`; x.\n\n| t |\n\n### beauty: 22 users\n\nCommand: b.\n")
    got = baselines.previous_sections(results, {"ml-100k": "", "beauty": ""})
    assert got == {
        "ml-100k": "### ml-100k\n\nCommand: `a`; x.\n\n| t |\n",
        "beauty": "### beauty: 22 users\n\nCommand: b.\n",
    }


def test_bench_set_flags_record_a_runnable_command():
    """The recorded ``--set`` flags parse back, through the shell and the benches' parser, to the same overrides."""
    import argparse
    import shlex

    baselines = load_bench("bench_baselines")
    overrides = ["stages=[prepare, text]", "sft.tasks={seqrec: 1.0}", "rl.lr=1e-4"]
    ap = argparse.ArgumentParser()
    baselines.add_set_option(ap)
    assert ap.parse_args(shlex.split(baselines.set_flags(overrides))).set == overrides
    assert ap.parse_args(["--set", "a=1", "b=2", "--set", "c=3"]).set == ["a=1", "b=2", "c=3"]


def test_bench_variants_load_for_both_datasets(tmp_path):
    bench = load_bench("bench_deepinterest")
    for dataset in bench.CONFIGS:
        for variant in bench.VARIANTS:
            cfg = bench.variant_config(dataset, variant, tmp_path, [])
            assert cfg.run_dir == str(tmp_path / dataset / variant)
            uses_interests = variant != "no-mlim"
            assert ("rldi" in cfg.stages) == uses_interests
            assert (cfg.sft.tasks.get("interest2sid", 0) > 0) == uses_interests
    assert bench.variant_config("ml-100k", "no-rldi", tmp_path, []).rldi.curate is False
    no_sasrec = bench.variant_config("beauty", "full", tmp_path, [], sasrec=False)
    assert "sasrec" not in no_sasrec.stages and {"popularity", "rldi", "eval", "rl"} <= set(no_sasrec.stages)
    # The shipped DeepInterestGR config is the benchmark's full variant.
    full = bench.variant_config("ml-100k", "full", tmp_path, [f"run_dir={tmp_path / 'r'}"])
    shipped = load_config(ROOT / "configs" / "deepinterest-ml-100k.yaml", [f"run_dir={tmp_path / 'r'}"])
    assert to_dict(full) == to_dict(shipped)


@pytest.mark.slow
def test_full_method_runs_end_to_end_on_a_tiny_dataset(tmp_path):
    """prepare -> interests -> rldi -> IEID text -> embed -> sid -> SFT with interest2sid -> eval -> RL (interest reward)."""
    from genrec.pipeline import run_pipeline

    items, sequences = make_dataset_frames()
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [
        (user, items["raw_id"][item], t)
        for user, seq in zip(sequences["raw_user"], sequences["item_ids"])
        for t, item in enumerate(seq)
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(raw / "tiny.inter.csv", index=False)
    items.drop(columns="item_id").rename(columns={"raw_id": "item_id"}).to_csv(raw / "tiny.item.csv", index=False)
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "stages=[prepare, interests, rldi, text, embed, sid, eval, rl]",
        "data.format=csv",
        f"data.path={raw}",
        "data.name=tiny",
        "data.kcore=0",
        *TINY_GENERATIVE,
        "embed.device=cpu",
        "sid.codebook_size=4",
        "sid.pca_dim=8",
        "sid.kmeans_iters=5",
        "sft.max_epochs=2",
        "sft.max_minutes=0",
        "rl.steps=2",
        "rl.eval_every=2",
        "rl.batch_size=8",
        "rl.group_size=4",
        "rl.max_minutes=0",
        "rl.eval_users=10",
        "sft.eval_users=10",
        "eval.ks=[1, 5, 10]",
    ]
    cfg = load_config(ROOT / "configs" / "deepinterest-ml-100k.yaml", overrides)
    assert cfg.text.interests == "positive" and "interest" in cfg.rl.rewards
    records = run_pipeline(cfg)
    run = tmp_path / "run"
    # sft is not in the stages: eval pulls it in; rldi is an input of text, sft and rl (through their config).
    for stage in ("interests", "rldi", "text", "sft", "eval", "rl"):
        assert (run / stage / "done.json").is_file(), stage
    rldi = json.loads((run / "rldi" / "rldi.json").read_text())
    assert {"heldout_accuracy", "heldout_auc", "labelled"} <= rldi.keys() and rldi["labelled"] > 0
    texts = pd.read_parquet(run / "text" / "items_text.parquet")["text"]
    assert texts.str.contains("Interests: ").any()
    assert records["text"]["summary"]["interests"] == "positive"
    sft = json.loads((run / "sft" / "done.json").read_text())["summary"]
    assert sft["examples_per_epoch"]["interest2sid"] > 0
    curves = [json.loads(r) for r in (run / "rl" / "rl_curves.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["reward/interest"]) for r in curves[1:])
    assert json.loads((run / "rl" / "eval" / "metrics.json").read_text())["test"]["hr@5"] >= 0
