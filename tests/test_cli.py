"""The command line: help and version, and one-line errors (cause -- fix, exit 2, no traceback)."""

import subprocess
import sys

import pytest

from nestune.cli import build_parser, main
from nestune.testing import save_tiny

SUBCOMMANDS = ["models", "data", "detect", "cluster", "train", "fold", "apply", "eval", "run", "compare",
               "report", "attack"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nestune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_version_and_help_of_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "nestune 0." in capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: nestune " + cmd in capsys.readouterr().out
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


def test_models_lists_the_catalog():
    out = run_cli("models")
    assert out.returncode == 0
    for alias in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert alias in out.stdout


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and " -- " in last, last
    for needle in needles:
        assert needle in last, last


def test_unknown_alias(tmp_path):
    _assert_one_line_error(run_cli("detect", "--model", "smollm3", "--out", str(tmp_path / "r")),
                           "unknown model 'smollm3'", "catalog alias")


def test_missing_local_path(tmp_path):
    _assert_one_line_error(run_cli("detect", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")),
                           "does not exist")


def test_bad_setting(tmp_path):
    _assert_one_line_error(run_cli("detect", "--set", "detect.z=1", "--out", str(tmp_path / "r")),
                           "unknown setting")


def test_stage_before_its_input(tmp_path):
    _assert_one_line_error(run_cli("cluster", "--out", str(tmp_path / "r")), "no completed 'detect' stage")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama"))


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("prompt\n", None),  # a csv whose only column is not the one asked for, below
])
def test_bad_prompt_files(tmp_path, tiny_folder, content, needle):
    f = tmp_path / ("p.txt" if needle else "p.csv")
    f.write_text(content if needle else "question\nhow?\n")
    spec = str(f) if needle else f"{f}:prompt"
    result = run_cli("detect", "--model", tiny_folder, "--harmful", spec, "--out", str(tmp_path / "r"))
    _assert_one_line_error(result, needle or "column")


def test_other_models_run_folder_is_refused(tmp_path, tiny_folder):
    from nestune.config import load_config
    from nestune.runfolder import RunFolder

    run = RunFolder(tmp_path / "r")
    run.save_config(load_config(overrides={"model": "smollm2-135m"}, environ={}))
    run.mark_done("detect")
    _assert_one_line_error(run_cli("detect", "--model", tiny_folder, "--out", str(tmp_path / "r")),
                           "holds a run of model 'smollm2-135m'")
