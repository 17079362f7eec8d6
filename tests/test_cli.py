import pandas as pd
import pytest

from genrec.cli import build_parser, main, resolve_history


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: genrec" in capsys.readouterr().out


def test_config_errors_exit_2_and_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'r'}\nstages: [prepare]\n")
    assert main(["status", str(cfg), "sasrec.nope=1"]) == 2
    assert "sasrec.nope" in capsys.readouterr().err


def test_status_lists_stages(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'r'}\n")
    assert main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "prepare" in out and "missing" in out


def test_resolve_history_by_id_and_title():
    items = pd.DataFrame({"item_id": [0, 1, 2], "title": ["Toy Story", "Heat", "heat"]})
    assert resolve_history(items, ["0", "toy story"]) == [0, 0]
    with pytest.raises(ValueError, match="names several items"):
        resolve_history(items, ["Heat"])
    with pytest.raises(ValueError, match="no item has the title"):
        resolve_history(items, ["Alien"])
    with pytest.raises(ValueError, match="out of range"):
        resolve_history(items, ["7"])
