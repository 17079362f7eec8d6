"""The accelerate SFT trainer: batching, schedule, resume after a kill, early stopping, the stage, LoRA, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import TINY_GENERATIVE  # noqa: E402
from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.data.dataset import Dataset  # noqa: E402
from genrec.model.recommender import GenerativeRecommender  # noqa: E402
from genrec.train.sft import lr_lambda, token_batches, train_sft  # noqa: E402

TESTS = Path(__file__).resolve().parent
TINY = TINY_GENERATIVE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_inputs(tiny_dataset):
    flat = np.random.default_rng(0).choice(64, size=tiny_dataset.num_items, replace=False)
    codes = np.stack([flat // 16, flat // 4 % 4, flat % 4], axis=1)  # (N, 3) unique
    texts = [f"{t}. {c}" for t, c in zip(tiny_dataset.titles, tiny_dataset.items["categories"])]
    return codes, texts


def write_sft_inputs(tiny_dataset, codes, texts, run_dir: Path) -> None:
    """Finished ``prepare``, ``sid`` and ``text`` stages in ``run_dir``, as the ``sft`` stage reads them."""
    import pandas as pd

    for stage in ("prepare", "sid", "text"):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "done.json").write_text("{}")
    tiny_dataset.items.to_parquet(run_dir / "prepare" / "items.parquet")
    pd.DataFrame(
        {
            "user_id": tiny_dataset.user_ids,
            "raw_user": tiny_dataset.raw_users,
            "item_ids": tiny_dataset.sequences,
            "timestamps": [np.arange(len(s)) for s in tiny_dataset.sequences],
            "valid_pos": tiny_dataset.valid_pos,
            "test_pos": tiny_dataset.test_pos,
        },
    ).to_parquet(run_dir / "prepare" / "sequences.parquet")
    np.save(run_dir / "sid" / "codes.npy", codes)
    pd.DataFrame({"item_id": np.arange(len(texts)), "text": texts}).to_parquet(run_dir / "text" / "items_text.parquet")


def config(*overrides: str):
    return load_config(None, ["run_dir=unused", *TINY, *overrides])


def model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_token_batches_cover_every_example_once_within_the_budget():
    lengths = np.random.default_rng(0).integers(5, 60, size=500)
    batches = token_batches(lengths, 256, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 256 for b in batches)
    # Length grouping keeps padding low: under 10% of the padded tokens here.
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.9
    assert [len(b) for b in token_batches(np.array([300, 10]), 256, np.random.default_rng(0))] == [1, 1]


def test_lr_schedule_warms_up_then_decays_to_zero():
    cosine = lr_lambda("cosine", warmup_steps=2, total_steps=6)
    assert [round(cosine(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    linear = lr_lambda("linear", warmup_steps=0, total_steps=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 1, 10)(9) == 1.0


class Killed(Exception):
    pass


def kill_after_first_epoch(cfg, dataset, codes, texts, root: Path) -> None:
    """An SFT run into ``root/out`` (work dir ``root/work``) killed right after its first epoch's checkpoint."""

    def kill(row, model):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_sft(cfg, dataset, codes, texts, root / "out", root / "work", on_epoch_end=kill)


def test_resume_after_a_kill_ends_with_exactly_the_weights_of_an_uninterrupted_run(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    cfg = config("sft.max_epochs=2", "model.dropout=0.2", "sft.tasks={seqrec: 1.0, item2sid: 0.5}")
    straight = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "a" / "out", tmp_path / "a" / "work")

    kill_after_first_epoch(cfg, tiny_dataset, codes, texts, tmp_path / "b")
    assert not (tmp_path / "b" / "out").exists()
    resumed = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "b" / "out", tmp_path / "b" / "work")

    a, b = model_tensors(tmp_path / "a" / "out" / "model"), model_tensors(tmp_path / "b" / "out" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curves_a = (tmp_path / "a" / "out" / "curves.jsonl").read_text().splitlines()
    curves_b = (tmp_path / "b" / "out" / "curves.jsonl").read_text().splitlines()
    drop_timing = [
        {k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "train_seconds", "cpu_seconds")}
        for r in curves_a + curves_b
    ]
    assert drop_timing[:2] == drop_timing[2:] and len(drop_timing) == 4
    for key in ("best_valid_ndcg@10", "best_epoch", "epochs", "steps"):
        assert straight[key] == resumed[key]


def test_weight_average_follows_the_formula_and_swaps_back():
    from genrec.train.sft import WeightAverage

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.9)
    expected = torch.zeros(1, 2)
    for step, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))  # 0.1, 2/11, 0.25: the early steps weigh more
        expected = d * expected + (1 - d) * value
    with average.swapped():
        assert torch.allclose(layer.weight, expected)
    assert torch.equal(layer.weight, torch.full((1, 2), 4.0))  # the trained weights are back
    assert torch.allclose(average.state_dict()["weight"], expected)


def test_weight_average_is_what_is_kept_and_it_resumes_exactly(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    plain = config("sft.max_epochs=2")
    averaged = config("sft.max_epochs=2", "sft.ema_decay=0.99")
    train_sft(plain, tiny_dataset, codes, texts, tmp_path / "p" / "out", tmp_path / "p" / "work")
    train_sft(averaged, tiny_dataset, codes, texts, tmp_path / "a" / "out", tmp_path / "a" / "work")

    kill_after_first_epoch(averaged, tiny_dataset, codes, texts, tmp_path / "b")
    assert (tmp_path / "b" / "work" / "checkpoint-0001" / "ema.pt").is_file()
    train_sft(averaged, tiny_dataset, codes, texts, tmp_path / "b" / "out", tmp_path / "b" / "work")
    p, a, b = (model_tensors(tmp_path / r / "out" / "model") for r in ("p", "a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the average came back from the checkpoint
    assert not all(torch.equal(a[k], p[k]) for k in a)  # and it is not the last trained weights


def test_a_checkpoint_resumes_only_under_the_same_config(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    work = tmp_path / "work"

    def kill(row, model):
        raise Killed

    with pytest.raises(Killed):
        train_sft(config("sft.max_epochs=2"), tiny_dataset, codes, texts, tmp_path / "out", work, on_epoch_end=kill)
    epochs = []
    # A longer time budget is no reason to start over ...
    train_sft(
        config("sft.max_epochs=2", "sft.max_minutes=60.0"),
        tiny_dataset,
        codes,
        texts,
        tmp_path / "out",
        work,
        on_epoch_end=lambda row, model: epochs.append(row["epoch"]),
    )
    assert epochs == [2]
    # ... another learning rate is: its checkpoints would resume a different run.
    epochs.clear()
    train_sft(
        config("sft.max_epochs=2", "sft.lr=0.005"),
        tiny_dataset,
        codes,
        texts,
        tmp_path / "out",
        work,
        on_epoch_end=lambda row, model: epochs.append(row["epoch"]),
    )
    assert epochs == [1, 2]


def test_early_stopping_and_the_time_budget(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    # A learning rate this small leaves the ranking unchanged: no improvement, stop after patience=1.
    summary = train_sft(
        config("sft.max_epochs=5", "sft.lr=1.0e-12", "sft.patience=1"),
        tiny_dataset,
        codes,
        texts,
        tmp_path / "a" / "out",
        tmp_path / "a" / "work",
    )
    assert (summary["stop_reason"], summary["epochs"], summary["best_epoch"]) == ("early_stop", 2, 1)
    summary = train_sft(
        config("sft.max_epochs=5", "sft.max_minutes=1.0e-6"),
        tiny_dataset,
        codes,
        texts,
        tmp_path / "b" / "out",
        tmp_path / "b" / "work",
    )
    assert (summary["stop_reason"], summary["epochs"]) == ("time_budget", 1)


def test_the_trie_softmax_trains_text_and_sid_labels_and_is_saved_with_the_model(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    cfg = config("sft.max_epochs=2", "sft.sid_softmax=trie", "sft.tasks={seqrec: 1.0, item2sid: 0.5, sid2title: 0.5}")
    summary = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "out", tmp_path / "work")
    rows = [json.loads(r) for r in (tmp_path / "out" / "curves.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] < rows[0]["loss"] and summary["best_valid_ndcg@10"] > 0

    assert json.loads((tmp_path / "out" / "model" / "genrec.json").read_text())["sid_softmax"] == "trie"
    rec = GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")
    assert rec.sid_softmax == "trie"
    with pytest.raises(ValueError, match="writes SIDs inside free text"):
        rec.check_free_text("GREAM's SRPO")
    out = rec.recommend(tiny_dataset.examples("valid").histories[:4], num_beams=64, k=tiny_dataset.num_items)
    # Every item comes out, and under the trie softmax their probabilities sum to 1.
    assert (out.items >= 0).all()
    torch.testing.assert_close(out.scores.exp().sum(1), torch.ones(4), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="sft.sid_softmax must be"):
        config("sft.sid_softmax=items")
    with pytest.raises(ConfigError, match="sft.sid_softmax=trie works with the seqrec recommender only"):
        config("sft.sid_softmax=trie", "stages=[sft, gream_sft]")
    # A genrec from before sid_softmax reads format 1 only, so it refuses this model instead of misscoring it.
    meta = json.loads((tmp_path / "out" / "model" / "genrec.json").read_text())
    assert meta["format_version"] == 2
    (tmp_path / "out" / "model" / "genrec.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match="format_version 1 with sid_softmax 'trie'"):
        GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")


def test_unknown_task_and_bad_codes_are_clear_errors(tiny_dataset, tmp_path):
    codes, texts = tiny_inputs(tiny_dataset)
    with pytest.raises(ConfigError, match="sft.tasks: unknown task 'reasoning'; known tasks: item2sid"):
        train_sft(config("sft.tasks={reasoning: 1.0}"), tiny_dataset, codes, texts, tmp_path / "o", tmp_path / "w")
    with pytest.raises(ValueError, match="cover 29 items but the dataset has 30: rerun the 'sid' stage"):
        train_sft(config(), tiny_dataset, codes[:-1], texts, tmp_path / "o", tmp_path / "w")


def test_stage_reads_its_inputs_and_writes_a_loadable_recommender(tiny_dataset, tmp_path):
    from genrec.pipeline import STAGES, StageContext
    from genrec.train.sft import run

    codes, texts = tiny_inputs(tiny_dataset)
    run_dir = tmp_path / "run"
    write_sft_inputs(tiny_dataset, codes, texts, run_dir)
    cfg = config(
        f"run_dir={run_dir}",
        "sft.max_epochs=2",
        "sft.tasks={seqrec: 1.0, item2sid: 1.0, sid2title: 0.5, titles2sid: 0.2}",
    )
    out = tmp_path / "out"
    ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["sft"], out=out, work=tmp_path / "work")
    summary = run(ctx)

    assert summary["epochs"] == 2 and summary["params"]["trainable"] == summary["params"]["total"] > 0
    assert summary["examples_per_epoch"]["item2sid"] == tiny_dataset.num_items
    rows = [json.loads(r) for r in (out / "curves.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all({"loss", "lr", "tokens_per_s", "valid_ndcg@10", "valid_hr@10"} <= r.keys() for r in rows)
    assert json.loads((out / "train_summary.json").read_text())["best_epoch"] == summary["best_epoch"]
    rec = GenerativeRecommender.load(out / "model", device="cpu")
    ex = Dataset.load(run_dir / "prepare", 5).examples("valid")
    items = rec.recommend(ex.histories[:4], num_beams=8, k=8).items
    assert items.shape == (4, 8) and ((items >= 0) & (items < tiny_dataset.num_items)).all()


def test_sft_with_a_local_pretrained_checkpoint_and_lora(tiny_dataset, tmp_path):
    sys.path.insert(0, str(TESTS))
    from test_model import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "base", tied=False)
    codes, texts = tiny_inputs(tiny_dataset)
    cfg_overrides = [
        f"model.backbone={tmp_path / 'base'}",
        "model.lora_r=4",
        "sft.max_epochs=1",
        "sft.lr=0.005",
        "sft.tasks={seqrec: 1.0, item2sid: 1.0}",
    ]
    cfg = config(*cfg_overrides)
    summary = train_sft(cfg, tiny_dataset, codes, texts, tmp_path / "out", tmp_path / "work")
    assert 0 < summary["params"]["trainable"] < summary["params"]["total"]
    rec = GenerativeRecommender.load(tmp_path / "out" / "model", device="cpu")
    assert rec.fmt.style == "instructions" and type(rec.model).__name__ == "Qwen2ForCausalLM"  # LoRA merged
    assert rec.recommend([[1, 2, 3]], num_beams=5, k=5).items.shape == (1, 5)

    # Under the trie softmax too, the loss reaches the SID rows of the LoRA model's head (PEFT's
    # trainable-tokens wrapper: the trained rows are a delta on the frozen ones).
    base_head = model_tensors(tmp_path / "base")["lm_head.weight"]
    train_sft(
        config(*cfg_overrides, "sft.sid_softmax=trie"), tiny_dataset, codes, texts, tmp_path / "t", tmp_path / "tw"
    )
    head = GenerativeRecommender.load(tmp_path / "t" / "model", device="cpu").model.get_output_embeddings().weight
    sid_rows = head.detach()[base_head.shape[0] :]  # the SID tokens come after the checkpoint's own
    assert torch.equal(head.detach()[: base_head.shape[0]], base_head)  # the old rows stay frozen
    assert (sid_rows - sid_rows.mean(dim=0)).abs().max() > 1e-4, "the SID rows (all started at one mean) did not train"


DDP_SCRIPT = """
import json, os, sys
import numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import make_dataset_frames
from genrec.config import load_config
from genrec.data.dataset import Dataset
from genrec.train.sft import train_sft

torch.set_num_threads(1)
items, sequences = make_dataset_frames()
dataset = Dataset(items, sequences, max_history=5)
flat = np.random.default_rng(0).choice(64, size=dataset.num_items, replace=False)
codes = np.stack([flat // 16, flat // 4 % 4, flat % 4], axis=1)
cfg = load_config(None, ["run_dir=unused", *{tiny!r}, "sft.max_epochs=2", "sft.batch_tokens=256"])
out = sys.argv[1]
rank = int(os.environ["RANK"])
sums = []
def record(row, model):
    sums.append(float(sum(p.detach().double().sum() for p in model.parameters())))
summary = train_sft(cfg, dataset, codes, dataset.titles, out + "/out", out + "/work", on_epoch_end=record)
json.dump({{"sums": sums, "summary": summary}}, open(f"{{out}}/rank{{rank}}.json", "w"))
"""


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel_over_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS), tiny=TINY)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["summary"]["num_processes"] == 2 for r in ranks)
    # Each process trained on different batches; identical weights after every epoch mean the
    # gradients were averaged across processes (and the weights moved: epoch 2 differs from 1).
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["sums"][0] != ranks[0]["sums"][1]
    assert ranks[0]["summary"]["best_valid_ndcg@10"] == ranks[1]["summary"]["best_valid_ndcg@10"]
    assert (tmp_path / "out" / "model" / "genrec.json").is_file()
