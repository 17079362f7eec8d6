"""SASRec -> SID-level knowledge distillation in SFT (``sft.distill``): targets, loss, batches, training."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import TINY_GENERATIVE  # noqa: E402
from genrec.baselines.sasrec import SASRec  # noqa: E402
from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.tasks.base import Example  # noqa: E402
from genrec.train.distill import SASRecTeacher, TriePaths, distill_loss, level_targets, prefix_ids  # noqa: E402
from genrec.train.sft import NextTokenLoss, collate, train_sft  # noqa: E402

CODES = np.array([[0, 0], [0, 1], [1, 0]])


def config(*overrides: str):
    return load_config(None, ["run_dir=unused", *TINY_GENERATIVE, *overrides])


def test_level_targets_factor_the_teacher_along_the_target_path():
    codes = torch.as_tensor(CODES)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    out = level_targets(probs, torch.tensor([1, 2]), codes, torch.as_tensor(prefix_ids(CODES)), width=2)
    # Level 0: items {0, 1} have code 0 (0.8), item 2 code 1 (0.2).
    assert out[:, 0].flatten().tolist() == pytest.approx([0.8, 0.2, 0.8, 0.2])
    # Level 1 under code 0 (target 1): items 0 and 1 renormalised; under code 1 (target 2): item 2 alone.
    assert out[0, 1].tolist() == pytest.approx([0.625, 0.375])
    assert out[1, 1].tolist() == pytest.approx([1.0, 0.0])


def test_trie_paths_equal_the_definition():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, [5, 4, 3], size=(40, 3)), axis=0)
    codes = np.concatenate([codes, np.zeros((len(codes), 1), dtype=np.int64)], axis=1)  # a dedup-like level
    codes = codes[rng.permutation(len(codes))]  # item ids are not in SID order
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(7, len(codes))) * 3, dtype=torch.float32), -1)
    targets = torch.as_tensor(rng.integers(0, len(codes), 7))
    paths = TriePaths(codes)
    fast = paths(probs[:, paths.order], targets)
    slow = level_targets(probs, targets, torch.as_tensor(codes), torch.as_tensor(prefix_ids(codes)), fast.shape[-1])
    assert torch.allclose(fast, slow, atol=1e-6)
    assert fast[:, 3, 0].tolist() == [1.0] * 7  # one item per full prefix: the last level is certain


def test_distill_loss_is_the_kl_over_the_level_tokens_only():
    table = torch.tensor([[5, 6], [7, 0]])  # level 1 has one code: its second slot does not exist
    mask = torch.tensor([[True, True], [True, False]])
    logits = torch.full((2, 9), 100.0)  # tokens outside the levels' SID ranges must not count
    logits[0, 5], logits[0, 6] = 0.0, float(np.log(3.0))  # student (0.25, 0.75) at level 0
    logits[1, 7] = 0.0
    targets = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    kl = distill_loss(logits, table, mask, torch.tensor([0, 1]), targets, temperature=1.0)
    expected = (0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75) + 0.0) / 2
    assert float(kl) == pytest.approx(expected, rel=1e-5)
    # A student that matches the targets has zero loss; the temperature scales by tau^2.
    logits[0, 6] = 0.0
    assert float(distill_loss(logits, table, mask, torch.tensor([0, 1]), targets, 1.0)) == pytest.approx(0.0, abs=1e-6)
    logits[0, 6] = float(np.log(3.0) * 2)  # at tau = 2 the student is again (0.25, 0.75)
    assert float(distill_loss(logits, table, mask, torch.tensor([0, 1]), targets, 2.0)) == pytest.approx(4 * expected)


def test_teacher_batches_only_the_examples_that_carry_their_items():
    torch.manual_seed(0)
    teacher = SASRecTeacher(SASRec(num_items=3, max_len=4), CODES, CODES + np.array([10, 20]))
    seqrec = Example(np.arange(6), np.arange(6), 0, items=np.array([2, 0, 1]), target_from=1)
    other = Example(np.arange(3), np.arange(3))
    batch = teacher.batch([other, seqrec], [2, 4])
    # Positions 2..5 (after the other example's 2), levels 0 1 0 1 for targets 0 and 1.
    assert batch["kd_positions"].tolist() == [2, 3, 4, 5] and batch["kd_levels"].tolist() == [0, 1, 0, 1]
    assert batch["kd_targets"].shape == (4, 2)
    assert torch.allclose(batch["kd_targets"].sum(-1), torch.ones(4))
    assert batch["level_token_ids"].tolist() == [[10, 11], [20, 21]]
    # Target 0 (after item 2) comes from SASRec's state at item 2 in one pass over the window [2, 0].
    with torch.no_grad():
        probs = torch.softmax(teacher.sasrec.item_logits(teacher.sasrec(torch.tensor([[0, 0, 3, 1]]))[0, 2]), -1)
    assert batch["kd_targets"][0].tolist() == pytest.approx([float(probs[:2].sum()), float(probs[2])], rel=1e-5)
    assert teacher.batch([other], [2]) is None
    with pytest.raises(ValueError, match="2 target items of 2 SID levels has 3 labelled tokens"):
        teacher.batch([seqrec], [3])
    with pytest.raises(ValueError, match="knows 4 items but the SIDs cover 3"):
        SASRecTeacher(SASRec(num_items=4, max_len=4), CODES, CODES)


def test_distillation_pulls_the_model_towards_the_teacher(tiny_dataset, tmp_path):
    from genrec.model.recommender import GenerativeRecommender
    from genrec.tasks.base import TaskData
    from genrec.tasks.seqrec import SeqRecTask

    flat = np.random.default_rng(0).choice(64, size=tiny_dataset.num_items, replace=False)
    codes = np.stack([flat // 16, flat // 4 % 4, flat % 4], axis=1)
    texts = [str(t) for t in tiny_dataset.titles]
    torch.manual_seed(0)
    sasrec = SASRec(tiny_dataset.num_items, max_len=5).eval()
    # An untrained teacher: nearly uniform over the items, unlike the labels.

    def kd_of(model_dir):
        rec = GenerativeRecommender.load(model_dir, device="cpu")
        data = TaskData(tiny_dataset.train_sequences(), rec.vocab.sid_to_ids(codes), texts, texts, rec.tokenizer, 5)
        examples = [SeqRecTask(data, rec.fmt)[i] for i in range(20)]
        inputs = collate(examples, rec.fmt.pad_id, "cpu")
        teacher = SASRecTeacher(sasrec, codes, data.sid_ids)
        inputs["distill"] = teacher.batch(examples, [int((e.labels[1:] != -100).sum()) for e in examples])
        with torch.no_grad():
            return float(NextTokenLoss(rec.model, 1.0)(**inputs) - NextTokenLoss(rec.model)(**inputs))

    kd = {}
    for weight in (0.0, 10.0):
        out = tmp_path / f"w{weight}"
        cfg = config("sft.max_epochs=20", "sft.lr=0.005", "sft.eval_every=20", f"sft.distill={weight}")
        train_sft(cfg, tiny_dataset, codes, texts, out / "out", out / "work", teacher=sasrec)
        kd[weight] = kd_of(out / "out" / "model")
    assert kd[10.0] < 0.6 * kd[0.0]  # measured 0.10 vs 0.24


def test_the_stage_loads_the_run_s_sasrec_as_teacher(tiny_dataset, tmp_path):
    from genrec.pipeline import STAGES, StageContext
    from genrec.train.sft import run
    from test_sft import tiny_inputs, write_sft_inputs

    codes, texts = tiny_inputs(tiny_dataset)
    run_dir = tmp_path / "run"
    write_sft_inputs(tiny_dataset, codes, texts, run_dir)
    cfg = config(f"run_dir={run_dir}", "sft.max_epochs=1", "sft.distill=1.0")
    ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=STAGES["sft"], out=tmp_path / "out", work=tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="needs stage 'sasrec'"):
        run(ctx)
    (run_dir / "sasrec").mkdir()
    (run_dir / "sasrec" / "done.json").write_text("{}")
    SASRec(tiny_dataset.num_items, max_len=5).save(run_dir / "sasrec" / "model.pt")
    summary = run(ctx)
    assert summary["epochs"] == 1 and summary["best_valid_ndcg@10"] >= 0
    rows = (tmp_path / "out" / "curves.jsonl").read_text().splitlines()
    assert len(rows) == 1


def test_distill_config_errors(tiny_dataset, tmp_path):
    from genrec.pipeline import STAGES, stage_inputs

    with pytest.raises(ConfigError, match="sft.distill must be >= 0"):
        config("sft.distill=-1")
    with pytest.raises(ConfigError, match="sft.distill_temperature must be > 0"):
        config("sft.distill_temperature=0")
    codes = np.stack([np.arange(tiny_dataset.num_items), np.zeros(tiny_dataset.num_items, dtype=int)], axis=1)
    texts = [str(t) for t in tiny_dataset.titles]
    with pytest.raises(ConfigError, match="needs the SASRec teacher"):
        train_sft(config("sft.distill=1"), tiny_dataset, codes, texts, tmp_path / "o", tmp_path / "w")
    with pytest.raises(ConfigError, match="add seqrec to sft.tasks"):
        train_sft(
            config("sft.distill=1", "sft.tasks={item2sid: 1.0}"),
            tiny_dataset,
            codes,
            texts,
            tmp_path / "o",
            tmp_path / "w",
            teacher=SASRec(tiny_dataset.num_items, 5),
        )
    assert "sasrec" in stage_inputs(STAGES["sft"], config("sft.distill=0.5"))
    assert "sasrec" not in stage_inputs(STAGES["sft"], config())
