"""`--out` never deletes what edgekd did not write: a user's folder or file is refused before any work."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgekd.cli import main
from edgekd.errors import StageError
from edgekd.manifest import MANIFEST, RUN_MARKER, check_out, check_run_dir, check_zip_out, write_stage
from edgekd.recipe import builtin_recipe_text


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("two years of work\n")
    return folder


def _stage(out: Path, stage: str = "finetune", files=None) -> Path:
    with write_stage(out, stage, {"p": 1}) as st:
        for rel, text in (files or {"config.json": "{}"}).items():
            (st.path / rel).write_text(text)
    return out


@pytest.fixture
def no_models(monkeypatch):
    """Reading the data or a model fails the test: the refusal must come first. Every command's module is
    imported first, so that none binds the stand-in by name and keeps it after the test."""
    import importlib

    import edgekd.data
    import edgekd.models
    import edgekd.tasks.classification

    for name in ("distill.finetune", "distill.distill", "compress.compress", "targets.export", "benchmarks.stage",
                 "bundle"):
        importlib.import_module(f"edgekd.{name}")

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or the data was read before --out was checked")

    for module, name in ((edgekd.models, "resolve_model"), (edgekd.data, "load_dataset"),
                         (edgekd.tasks.classification, "load_dataset")):
        monkeypatch.setattr(module, name, forbidden)


def _commands(tmp_path: Path, out: Path) -> dict[str, list[str]]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(builtin_recipe_text())
    some = str(tmp_path / "absent-stage")  # inputs that would fail later, with another message
    return {
        "finetune": ["finetune", "--recipe", str(recipe), "--out", str(out)],
        "distill": ["distill", "--recipe", str(recipe), "--teacher", some, "--out", str(out)],
        "compress": ["compress", "--recipe", str(recipe), "--student", some, "--out", str(out)],
        "export": ["export", "--recipe", str(recipe), "--model", some, "--target", "android", "--out", str(out)],
        "bench": ["bench", some, "--out", str(out)],
        "run": ["run", str(recipe), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
        "bundle": ["bundle", some, "--platform", "android", "--recipe", str(recipe), "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["finetune", "distill", "compress", "export", "bench", "run", "demo", "bundle"])
def test_a_users_folder_survives_every_command(tmp_path, capsys, no_models, command):
    folder = _user_folder(tmp_path)
    capsys.readouterr()  # what importing the libraries logged in the fixture
    assert main(_commands(tmp_path, folder)[command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {folder} ") and "remove it yourself" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert (folder / "thesis.txt").read_text() == "two years of work\n"


@pytest.mark.parametrize("command", ["finetune", "export", "run", "bundle"])
def test_a_file_at_out_is_refused(tmp_path, capsys, no_models, command):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    capsys.readouterr()
    assert main(_commands(tmp_path, file)[command]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert file.read_text() == "mine\n"


def test_a_stage_replaces_only_its_own_kind(tmp_path):
    out = _stage(tmp_path / "finetune")
    check_out(out, "finetune")  # the same kind: replaceable (a rerun with a changed recipe)
    _stage(out, files={"config.json": '{"new": 1}'})
    assert (out / "config.json").read_text() == '{"new": 1}'
    with pytest.raises(StageError, match="holds an edgekd 'finetune' stage, not 'distill'"):
        check_out(out, "distill")
    check_out(tmp_path / "absent", "distill")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "distill")


def test_a_damaged_stage_is_replaced_but_a_users_file_inside_it_is_not(tmp_path):
    out = _stage(tmp_path / "finetune")
    (out / "config.json").write_text("changed")  # damaged: checksums no longer match, still ours
    check_out(out, "finetune")
    (out / "my-notes.md").write_text("mine")
    with pytest.raises(StageError, match=r"files edgekd did not write \(my-notes.md\)"):
        check_out(out, "finetune")
    (out / "my-notes.md").unlink()
    (out / MANIFEST).write_text("not json")  # we cannot tell it is ours: refused
    with pytest.raises(StageError, match="did not write"):
        check_out(out, "finetune")


def test_write_stage_keeps_its_safety_net(tmp_path):
    folder = _user_folder(tmp_path)
    with pytest.raises(StageError, match="remove it yourself"):
        _stage(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left either


def test_a_users_folder_put_at_out_while_the_stage_ran_survives(tmp_path):
    out = tmp_path / "finetune"
    with pytest.raises(StageError, match="did not write"):
        with write_stage(out, "finetune", {}) as st:
            (st.path / "config.json").write_text("{}")
            _user_folder(tmp_path).rename(out)  # someone uses the name during a long stage
    assert (out / "thesis.txt").is_file()


def test_run_directories_are_recognized_by_their_marker(tmp_path):
    run = tmp_path / "run"
    check_run_dir(run)
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(StageError, match="not an edgekd run directory"):
        check_run_dir(run)
    (run / RUN_MARKER).write_text("")
    check_run_dir(run)
    legacy = tmp_path / "legacy"  # a run from before the marker: its recipe and a finetune stage of ours
    legacy.mkdir()
    (legacy / "recipe.yaml").write_text("name: x\n")
    _stage(legacy / "finetune")
    check_run_dir(legacy)


def test_a_bundle_zip_not_written_by_edgekd_is_refused(tmp_path):
    zip_path = tmp_path / "android.zip"
    zip_path.write_bytes(b"my own archive")
    with pytest.raises(StageError, match="not an edgekd bundle zip"):
        check_zip_out(zip_path, "android")
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("android/manifest.json", json.dumps({"schema": "edgekd.manifest/1", "stage": "bundle"}))
    check_zip_out(zip_path, "android")
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr("elsewhere/photo.jpg", b"...")
    with pytest.raises(StageError):
        check_zip_out(zip_path, "android")
