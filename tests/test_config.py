from pathlib import Path

import pytest

from genrec.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_overrides_and_types(tmp_path):
    cfg = load_config(None, ["run_dir=r", "sasrec.lr=0.01", "eval.ks=[10, 5]", "eval.exclude_seen=false", "seed=7"])
    assert cfg.sasrec.lr == 0.01 and cfg.eval.ks == [5, 10] and cfg.eval.exclude_seen is False and cfg.seed == 7


def test_a_mapping_value_replaces_the_configs_not_merges(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "run_dir: r\nrl:\n  rewards: {rank: 1.0}\n  lr: 0.001\nsft:\n  tasks: {seqrec: 1.0, item2sid: 0.5}\n"
    )
    cfg = load_config(path, ["rl.rewards={exact: 1.0}", "sft.tasks={seqrec: 1.0}", "rl.steps=5"])
    # Sections merge key by key (rl.lr stays); a mapping inside a section is one value.
    assert cfg.rl.rewards == {"exact": 1.0} and cfg.rl.lr == 0.001 and cfg.rl.steps == 5
    assert cfg.sft.tasks == {"seqrec": 1.0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("sasrec.hiden_size=3", "unknown config key sasrec.hiden_size"),
        ("sasrec.hidden_size=abc", "sasrec.hidden_size: expected an integer"),
        ("eval.exclude_seen=1", "eval.exclude_seen: expected true or false"),
        ("data.protocol=random", "data.protocol must be 'loo' or 'chrono'"),
        ("nosuch=1", "unknown config key nosuch"),
        ("sasrec=3", "sasrec: expected a mapping"),
        ("sasrec.lr_drop_factor=1.5", r"sasrec.lr_drop_factor must be in \(0, 1\)"),
        ("sft.lr_drops=1", "sft.lr_drops works with model.layout=items"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["run_dir=r", override])


def test_run_dir_required():
    with pytest.raises(ConfigError, match="run_dir is required"):
        load_config(None, [])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: r\nsasrec:\n  dropout: 2.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*sasrec.dropout"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    from genrec.pipeline import STAGES

    cfg = load_config(path)
    assert all(stage in STAGES for stage in cfg.stages)
    assert cfg.run_dir


def test_float_strings_from_yaml_are_numbers():
    cfg = load_config(None, ["run_dir=r", "sasrec.lr=1e-5"])
    assert cfg.sasrec.lr == 1e-5
    with pytest.raises(ConfigError, match="sasrec.lr: expected a number"):
        load_config(None, ["run_dir=r", "sasrec.lr=fast"])
