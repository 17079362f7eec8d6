import json
from dataclasses import replace

import pytest

from genrec import pipeline
from genrec.config import load_config, to_dict
from genrec.pipeline import Stage, run_pipeline, run_stage, stage_status

CALLS = []


def make_numbers(ctx):
    CALLS.append("numbers")
    (ctx.out / "numbers.txt").write_text(" ".join(str(i * ctx.cfg.seed) for i in range(5)))
    return {"count": 5}


def sum_numbers(ctx):
    CALLS.append("total")
    nums = (ctx.input("numbers") / "numbers.txt").read_text().split()
    if (ctx.work / "crash").exists():
        raise KeyboardInterrupt  # a kill in the middle of the stage
    (ctx.out / "total.txt").write_text(str(sum(map(int, nums))))
    return {}


@pytest.fixture
def stages(monkeypatch):
    CALLS.clear()
    fake = {
        "numbers": Stage("numbers", f"{__name__}:make_numbers", ("eval",)),
        "total": Stage("total", f"{__name__}:sum_numbers", ("eval",), ("numbers",)),
    }
    monkeypatch.setattr(pipeline, "STAGES", fake)
    return fake


def cfg_for(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "stages=[numbers, total]", *extra])


def test_rerun_skips_and_force_redoes(stages, tmp_path):
    cfg = cfg_for(tmp_path)
    run_pipeline(cfg)
    assert CALLS == ["numbers", "total"]
    done = json.loads((tmp_path / "run/total/done.json").read_text())
    assert done["config"]["eval"]["ks"] == [1, 5, 10, 20] and "total.txt" in done["files"]
    run_pipeline(cfg)
    assert CALLS == ["numbers", "total"]
    run_pipeline(cfg, force=["total"])
    assert CALLS == ["numbers", "total", "total"]


def test_config_change_makes_downstream_stale(stages, tmp_path):
    run_pipeline(cfg_for(tmp_path))
    cfg2 = cfg_for(tmp_path, "seed=3")
    assert stage_status(cfg2, "numbers") == "stale"
    run_pipeline(cfg2)
    assert (tmp_path / "run/total/total.txt").read_text() == str(3 * 10)


def test_corrupted_output_is_detected_and_rerun(stages, tmp_path):
    cfg = cfg_for(tmp_path)
    run_pipeline(cfg)
    (tmp_path / "run/numbers/numbers.txt").write_text("0 1")  # truncated
    assert stage_status(cfg, "numbers") == "corrupt"
    CALLS.clear()
    run_pipeline(cfg)
    # The rerun restores identical content, so the downstream stage's inputs are unchanged.
    assert CALLS == ["numbers"]
    assert (tmp_path / "run/numbers/numbers.txt").read_text() == "0 42 84 126 168"
    assert stage_status(cfg, "total") == "done"


def test_killed_stage_leaves_no_output_and_resumes(stages, tmp_path):
    cfg = cfg_for(tmp_path)
    (tmp_path / "run/.total.work").mkdir(parents=True)
    (tmp_path / "run/.total.work/crash").touch()
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    assert stage_status(cfg, "numbers") == "done"
    assert not (tmp_path / "run/total").exists()
    (tmp_path / "run/.total.work/crash").unlink()
    CALLS.clear()
    run_pipeline(cfg)
    assert CALLS == ["total"]
    assert not (tmp_path / "run/.total.work").exists()


def test_checkpoints_of_another_config_are_not_resumed(stages, tmp_path):
    stages["total"] = Stage("total", f"{__name__}:sum_numbers", ("eval", "sasrec"), ("numbers",))
    work = tmp_path / "run/.total.work"
    work.mkdir(parents=True)
    (work / "crash").touch()  # stands for the checkpoint of a killed run
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg_for(tmp_path))
    # Another wall-clock budget is the same run given more time: the checkpoint stays.
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg_for(tmp_path, "sasrec.max_minutes=5"))
    # Another setting of the stage's own sections: the checkpoint is dropped, the stage starts over.
    CALLS.clear()
    run_pipeline(cfg_for(tmp_path, "sasrec.lr=0.01"))
    assert CALLS == ["total"] and (tmp_path / "run/total/total.txt").is_file()
    assert not work.exists()


def test_unknown_stage_is_an_error(stages, tmp_path):
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        run_stage(cfg_for(tmp_path), "nope")


def write_sections(ctx):
    """Stand-in for any real stage: its output is the config sections it reads."""
    CALLS.append(ctx.stage.name)
    sections = {s: to_dict(getattr(ctx.cfg, s)) for s in ctx.stage.sections}
    (ctx.out / "sections.json").write_text(json.dumps(sections, sort_keys=True))
    return {}


@pytest.fixture
def real_graph(monkeypatch):
    """The real stages and their dependencies, each stage's work replaced by :func:`write_sections`."""
    CALLS.clear()
    fake = {name: replace(stage, target=f"{__name__}:write_sections") for name, stage in pipeline.STAGES.items()}
    monkeypatch.setattr(pipeline, "STAGES", fake)


@pytest.mark.parametrize("stage", ["rl", "gream_rl"])
@pytest.mark.parametrize(
    ("rewards", "reads", "retrain"),
    [
        ("{rank: 1.0, trm: 0.5}", "sasrec", "sasrec.lr=0.01"),
        ("{rank: 1.0, semantic: 0.5}", "embed", "embed.batch_size=7"),
        ("{rank: 1.0}", None, "sasrec.lr=0.01"),
    ],
)
def test_rl_depends_on_the_stages_its_rewards_read(real_graph, tmp_path, stage, rewards, reads, retrain):
    base = [f"run_dir={tmp_path / 'run'}", f"stages=[{stage}]", f"rl.rewards={rewards}"]
    cfg = load_config(None, base)
    run_pipeline(cfg)
    assert ("sasrec" in CALLS) == (reads == "sasrec")  # a reward's input runs first, and only when needed
    # A new output of that stage (here: retrained under another config) makes the RL stage stale ...
    changed = load_config(None, [*base, retrain])
    run_stage(changed, retrain.split(".")[0])
    assert stage_status(changed, stage) == ("stale" if reads else "done")
    # ... and the rerun redoes it (after sid, which a new embedding also makes stale).
    CALLS.clear()
    run_pipeline(changed)
    assert CALLS == {"sasrec": [stage], "embed": ["sid", stage], None: []}[reads]


def test_eval_splits_redo_the_evaluations_and_not_the_training(real_graph, tmp_path):
    """eval.splits is read by the final evaluations only: SFT stays done, the eval stages after it rerun."""
    base = [f"run_dir={tmp_path / 'run'}", "stages=[sft, eval, gream_sft, gream_eval]"]
    run_pipeline(load_config(None, base))
    test_only = load_config(None, [*base, "eval.splits=[test]"])
    status = {s: stage_status(test_only, s) for s in ("sft", "eval", "gream_sft", "gream_eval", "sasrec")}
    assert status == {"sft": "done", "eval": "stale", "gream_sft": "done", "gream_eval": "stale", "sasrec": "missing"}
    CALLS.clear()
    run_pipeline(test_only)
    assert CALLS == ["eval", "gream_eval"]


def test_a_key_added_later_keeps_older_runs_done_at_its_default(real_graph, tmp_path):
    """rl.scale_rewards came after runs were made: at its default it is out of the hash, any other value redoes RL."""
    base = [f"run_dir={tmp_path / 'run'}", "stages=[rl]"]
    run_pipeline(load_config(None, base))
    done = json.loads((tmp_path / "run/rl/done.json").read_text())
    assert "scale_rewards" not in done["config"]["rl"] and "bgae_k" in done["config"]["rl"]
    assert stage_status(load_config(None, [*base, "rl.scale_rewards=group"]), "rl") == "done"
    assert stage_status(load_config(None, [*base, "rl.scale_rewards=batch"]), "rl") == "stale"


def test_sid_from_sasrec_depends_on_sasrec(real_graph, tmp_path):
    """sid.embedding=sasrec runs SASRec first and a retrained SASRec makes the SIDs stale; text SIDs never read it."""
    base = [f"run_dir={tmp_path / 'run'}", "stages=[sid]"]
    run_pipeline(load_config(None, base))
    assert "sasrec" not in CALLS
    collaborative = [*base, "sid.embedding=sasrec"]
    CALLS.clear()
    run_pipeline(load_config(None, collaborative))
    assert CALLS == ["sasrec", "sid"]
    retrained = load_config(None, [*collaborative, "sasrec.lr=0.01"])
    run_stage(retrained, "sasrec")
    assert stage_status(retrained, "sid") == "stale"


def test_sft_on_sasrec_item_vectors_depends_on_sasrec(real_graph, tmp_path):
    """model.item_embedding=sasrec makes SFT read SASRec; a learned table does not, and the default keeps runs done."""
    base = [f"run_dir={tmp_path / 'run'}", "stages=[sft]"]
    run_pipeline(load_config(None, base))
    assert "sasrec" not in CALLS
    assert stage_status(load_config(None, [*base, "model.item_embedding=none"]), "sft") == "done"
    assert stage_status(load_config(None, [*base, "model.item_embedding=learned"]), "sft") == "stale"
    vectors = [*base, "model.item_embedding=sasrec"]
    CALLS.clear()
    run_pipeline(load_config(None, vectors))
    assert CALLS == ["sasrec", "sft"]
    retrained = load_config(None, [*vectors, "sasrec.lr=0.01"])
    run_stage(retrained, "sasrec")
    assert stage_status(retrained, "sft") == "stale"
