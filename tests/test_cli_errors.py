"""The command line: user errors are one `error:` line and exit 1, usage errors exit 2, help has examples."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgekd.cli import build_parser, main
from edgekd.errors import install_command

from conftest import make_rows, write_csv

EDGEKD = Path(sys.executable).with_name("edgekd")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(capsys, *argv, only_line: bool = True) -> str:
    """Exit 1, nothing on stdout, no traceback, exactly one `error:` line on stderr (and, with
    `only_line`, nothing else: library chatter printed while the first heavy imports happen would
    make the outcome depend on test order, so commands that import the training stack check only
    the `error:` line here and the whole of stderr in a fresh process below)."""
    code, out, err = _run(capsys, *argv)
    assert code == 1, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0]
    if only_line:
        assert len(lines) == 1, err
    return errors[0]


def _write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_missing_recipe_file(tmp_path, capsys):
    line = _one_error_line(capsys, "run", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert "nope.yaml does not exist" in line
    assert not (tmp_path / "out").exists()


def test_run_recipe_with_unknown_key(tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", {"version": 1, "student": {"temprature": 2.0}})
    line = _one_error_line(capsys, "run", recipe, "--out", tmp_path / "out")
    assert "unknown key 'student.temprature'" in line and "did you mean 'temperature'" in line
    assert not (tmp_path / "out").exists()


def test_run_recipe_with_invalid_yaml(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student: [unclosed\n")
    assert "not valid YAML" in _one_error_line(capsys, "run", recipe, "--out", tmp_path / "out")


def test_run_recipe_whose_train_file_is_missing(tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", {"data": {"train": "data/missing.csv", "validation": None,
                                                          "test": None}})
    line = _one_error_line(capsys, "run", recipe, "--out", tmp_path / "out", only_line=False)
    assert str(tmp_path / "data" / "missing.csv") in line and "does not exist" in line
    assert not (tmp_path / "out").exists()                       # failed before any stage started


def test_run_recipe_with_unknown_quant_spec_fails_before_training(tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", {"compress": {"quant": ["int3"]}})
    line = _one_error_line(capsys, "run", recipe, "--out", tmp_path / "out", only_line=False)
    assert "unknown quantization spec 'int3'" in line
    assert not (tmp_path / "out").exists()


def test_run_user_error_is_the_only_stderr_line_in_a_fresh_process(tmp_path):
    recipe = _write_recipe(tmp_path / "r.yaml", {"data": {"train": "missing.csv", "validation": None,
                                                          "test": None}})
    result = subprocess.run([str(EDGEKD), "run", str(recipe), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: data file ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_verify_dir_without_manifest(tmp_path, capsys):
    (tmp_path / "model.pte").write_bytes(b"x")
    line = _one_error_line(capsys, "verify", tmp_path)
    assert "no manifest.json" in line


def test_verify_ok(tmp_path, capsys):
    from edgekd.manifest import write_stage

    with write_stage(tmp_path / "stage", "finetune", {}) as st:
        (st.path / "a.txt").write_text("a")
    code, out, err = _run(capsys, "verify", tmp_path / "stage")
    assert code == 0 and out.startswith("ok: ") and "finetune, 1 files" in out


def test_verify_tampered_stage(tmp_path, capsys):
    from edgekd.manifest import write_stage

    with write_stage(tmp_path / "stage", "finetune", {}) as st:
        (st.path / "a.txt").write_text("a")
    (tmp_path / "stage" / "a.txt").write_text("b")
    assert "checksum mismatch for 'a.txt'" in _one_error_line(capsys, "verify", tmp_path / "stage")


def test_export_unknown_target_lists_known_ones(tmp_path, capsys):
    line = _one_error_line(capsys, "export", "--model", tmp_path / "no-model", "--target", "iphone",
                           "--out", tmp_path / "out")
    assert "unknown target 'iphone'" in line and "known: android" in line
    assert not (tmp_path / "out").exists()


def test_export_unknown_format(tmp_path, capsys):
    line = _one_error_line(capsys, "export", "--model", tmp_path / "no-model", "--target", "android",
                           "--format", "tflite", "--out", tmp_path / "out")
    assert "android/tflite" in line and "android/executorch" in line


def test_export_unknown_quant(tmp_path, capsys):
    line = _one_error_line(capsys, "export", "--model", tmp_path / "no-model", "--target", "android",
                           "--quant", "int3", "--out", tmp_path / "out")
    assert "unknown quantization spec 'int3'" in line


@pytest.fixture
def small_recipe(tmp_path) -> Path:
    for name, seed in (("train", 1), ("validation", 2), ("test", 3)):
        write_csv(tmp_path / f"{name}.csv", make_rows(12, seed))
    return _write_recipe(tmp_path / "r.yaml", {"data": {"train": "train.csv", "validation": "validation.csv",
                                                        "test": "test.csv"}})


def test_compress_unknown_spec_rejected_before_student_is_read(tmp_path, small_recipe, capsys):
    line = _one_error_line(capsys, "compress", "--recipe", small_recipe, "--student", tmp_path / "no-student",
                           "--quant", "int8", "--quant", "int3", "--out", tmp_path / "out")
    assert "unknown quantization spec 'int3'" in line
    assert ("known: fp16, fp32, int4, int4-g128, int4-g64, int4-hqq, int4-weights, int8, int8-static, "
            "int8-weights") in line
    assert not (tmp_path / "out").exists()


def test_compress_missing_student_dir(tmp_path, small_recipe, capsys):
    line = _one_error_line(capsys, "compress", "--recipe", small_recipe, "--student", tmp_path / "no-student",
                           "--quant", "int8", "--out", tmp_path / "out")
    assert "no-student" in line and "no manifest.json" in line


def test_compress_student_dir_of_wrong_stage(tmp_path, small_recipe, capsys):
    from edgekd.manifest import write_stage

    with write_stage(tmp_path / "ft", "finetune", {}) as st:
        (st.path / "config.json").write_text("{}")
    line = _one_error_line(capsys, "compress", "--recipe", small_recipe, "--student", tmp_path / "ft",
                           "--out", tmp_path / "out")
    assert "expected 'distill'" in line


def test_bench_unsupported_device(tmp_path, capsys):
    line = _one_error_line(capsys, "bench", tmp_path, "--out", tmp_path / "b", "--device", "phone")
    assert "device 'phone'" in line


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["run"], ["run", "r.yaml"], ["verify"],
                                  ["bench", "x", "--out", "o", "--iterations", "many"],
                                  ["export", "--model", "m", "--out", "o"], ["demo", "--no-such-flag"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: edgekd" in err and "Traceback" not in err


def test_demo_print_recipe_is_valid_yaml(capsys):
    from edgekd.recipe import builtin_recipe, recipe_from_dict

    code, out, err = _run(capsys, "demo", "--print-recipe")
    assert code == 0 and err == ""
    data = yaml.safe_load(out)
    assert isinstance(data, dict) and data["version"] == 1
    assert recipe_from_dict(data, Path.cwd()) == builtin_recipe()


# --- help -----------------------------------------------------------------------------------

def _subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_every_subcommand_is_covered():
    assert set(_subcommands()) >= {"demo", "run", "finetune", "distill", "compress", "export", "bench",
                                   "report", "verify"}


def _help(*argv) -> str:
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run([str(EDGEKD), *argv, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help_shows_an_example(command):
    text = _help(command)
    assert text.startswith(f"usage: edgekd {command}")
    example = text.split("example:", 1)[1]
    assert f"edgekd {command}" in example


def test_top_level_help_lists_commands():
    text = _help()
    assert all(command in text for command in _subcommands())


def test_top_level_help_shows_an_example():
    assert "example:" in _help()


def test_missing_runtime_is_named_with_the_extra_before_any_work(tmp_path, tiny_recipe_dict, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: android/executorch needs executorch, which is not installed; " \
                      f"run `{install_command('android')}`"
    assert not (tmp_path / "run").exists()


def test_the_install_fix_names_this_installation(monkeypatch):
    """From a source folder (`pip install -e .`), `pip install 'edgekd[x]'` would look for edgekd on PyPI: the
    fix a message gives installs the extra from that folder; a PyPI install gets the package name."""
    import json
    from importlib import metadata

    class Installed:
        def __init__(self, direct):
            self.direct = direct

        def read_text(self, name):
            return None if self.direct is None else json.dumps(self.direct)

    cases = [({"url": "file:///src/my%20edgekd", "dir_info": {"editable": True}},
              "pip install -e '/src/my edgekd[litert]'"),
             ({"url": "file:///src/edgekd", "dir_info": {}}, "pip install '/src/edgekd[litert]'"),
             (None, "pip install 'edgekd[litert]'")]
    for direct, command in cases:
        # The source folder's edgekd.egg-info (no install record) comes first on the path when run from there.
        monkeypatch.setattr(metadata, "distributions", lambda name, d=direct: [Installed(None), Installed(d)])
        assert install_command("litert") == command


# --- recipes that cannot be read, and the last-resort handler -------------------------------

def test_run_recipe_that_is_a_folder(tmp_path, capsys):
    line = _one_error_line(capsys, "run", tmp_path, "--out", tmp_path / "out")
    assert line == f"error: recipe {tmp_path} is a folder, not a YAML file; give the recipe file itself " \
                   f"(`edgekd demo --print-recipe` prints one to start from)"
    assert not (tmp_path / "out").exists()


def _boom(args):
    raise RuntimeError("boom\nsecond line")


def test_an_unexpected_exception_is_one_line_with_a_distinct_exit_code(tmp_path, capsys, monkeypatch):
    import edgekd.cli as cli

    monkeypatch.setattr(cli, "cmd_verify", _boom)
    monkeypatch.delenv("EDGEKD_DEBUG", raising=False)
    code, out, err = _run(capsys, "verify", tmp_path)
    assert code == cli.INTERNAL_ERROR == 3 and out == ""
    assert err == ("error: internal error: RuntimeError: boom; rerun with --debug (or EDGEKD_DEBUG=1) for the "
                   "traceback, and report it\n")
    for argv in (["--debug", "verify", tmp_path], ["verify", tmp_path, "--debug"]):  # the way the line names works
        code, out, err = _run(capsys, *argv)
        assert code == 3 and "Traceback (most recent call last)" in err and 'RuntimeError("boom' in err
        assert err.strip().splitlines()[-1] == "error: internal error: RuntimeError: boom"


def test_edgekd_debug_shows_the_traceback_in_a_fresh_process(tmp_path):
    code = ("import sys, edgekd.cli as cli\n"
            "def boom(args): raise KeyError('k')\n"
            "cli.cmd_verify = boom\n"
            f"sys.exit(cli.main(['verify', {str(tmp_path)!r}]))\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "EDGEKD_DEBUG"})
    assert quiet.returncode == 3 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == ["error: internal error: KeyError: 'k'; rerun with --debug (or "
                                                 "EDGEKD_DEBUG=1) for the traceback, and report it"]
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EDGEKD_DEBUG": "1"})
    assert loud.returncode == 3 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == "error: internal error: KeyError: 'k'"


def test_user_errors_stay_exit_1_and_usage_errors_exit_2(tmp_path, capsys):
    assert _run(capsys, "verify", tmp_path)[0] == 1
    with pytest.raises(SystemExit) as info:
        main(["verify", "--debug"])
    assert info.value.code == 2
