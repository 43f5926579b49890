"""Stage directories: atomic writes, manifests that match the files, verification, skip decisions."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgekd.errors import StageError
from edgekd.manifest import (
    MANIFEST,
    SCHEMA,
    atomic_write_text,
    inputs_digest,
    is_done,
    read_manifest,
    stage_input,
    stage_key,
    verify_stage,
    write_stage,
)

PARAMS = {"layers": [1, 3], "temperature": 2.0}
INPUTS = {"teacher": {"path": "/runs/x/finetune", "sha256": "ab" * 32}}
FILES = {"model.safetensors": b"\x00\x01weights" * 1000, "config.json": b'{"a": 1}\n',
         "sub/dir/notes.txt": "caf\u00e9\n".encode(), ".hidden": b"dot file"}


def _write(out: Path, files=FILES, params=PARAMS, inputs=INPUTS, stage="distill", metrics=None):
    with write_stage(out, stage, params, inputs) as st:
        for rel, data in files.items():
            (st.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (st.path / rel).write_bytes(data)
        st.metrics = metrics or {"accuracy": 0.5}
        st.extra["max_length"] = 64
    return out


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.fixture
def stage_dir(tmp_path) -> Path:
    return _write(tmp_path / "run" / "distill")


def test_manifest_lists_every_file_with_its_real_sha256(stage_dir):
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    assert manifest["schema"] == SCHEMA and manifest["stage"] == "distill"
    assert manifest["files"] == {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                                 for rel, data in FILES.items()}
    on_disk = {p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*") if p.is_file()}
    assert on_disk == set(FILES) | {MANIFEST}
    assert manifest["params"] == PARAMS and manifest["inputs"] == INPUTS
    assert manifest["key"] == stage_key(PARAMS, INPUTS)
    assert manifest["metrics"] == {"accuracy": 0.5} and manifest["max_length"] == 64
    assert "torch" in manifest["versions"] and "python" in manifest["versions"]
    assert verify_stage(stage_dir, "distill") == manifest


def test_no_temporary_directories_or_files_remain(stage_dir):
    assert _siblings(stage_dir) == ["distill"]
    assert not [p for p in stage_dir.rglob("*") if ".tmp-" in p.name]


def test_exception_inside_block_leaves_nothing(tmp_path):
    out = tmp_path / "run" / "distill"
    with pytest.raises(RuntimeError, match="training diverged"):
        with write_stage(out, "distill", PARAMS, INPUTS) as st:
            (st.path / "model.safetensors").write_bytes(b"half")
            assert st.path.parent == out.parent and st.path != out
            raise RuntimeError("training diverged")
    assert not out.exists()
    assert _siblings(out) == []


def test_interrupt_inside_block_leaves_nothing(tmp_path):
    out = tmp_path / "distill"
    with pytest.raises(KeyboardInterrupt):
        with write_stage(out, "distill", PARAMS, INPUTS) as st:
            (st.path / "x").write_text("partial")
            raise KeyboardInterrupt
    assert _siblings(out) == []


def test_exception_keeps_the_previous_complete_stage(stage_dir):
    before = read_manifest(stage_dir)
    with pytest.raises(ValueError):
        with write_stage(stage_dir, "distill", {"other": 1}, INPUTS) as st:
            (st.path / "model.safetensors").write_bytes(b"new")
            raise ValueError("boom")
    assert verify_stage(stage_dir, "distill") == before
    assert _siblings(stage_dir) == ["distill"]


def test_rewrite_replaces_the_stage_atomically(stage_dir):
    old = read_manifest(stage_dir)
    new_files = {"model.safetensors": b"new weights", "extra.bin": b"1234"}
    with write_stage(stage_dir, "distill", {"layers": [0]}, INPUTS) as st:
        for rel, data in new_files.items():
            (st.path / rel).write_bytes(data)
        # Until the block completes, readers still see the old, complete stage.
        assert verify_stage(stage_dir, "distill") == old
        assert (stage_dir / "config.json").is_file()
    manifest = verify_stage(stage_dir, "distill")
    assert set(manifest["files"]) == set(new_files)
    assert (stage_dir / "model.safetensors").read_bytes() == b"new weights"
    assert not (stage_dir / "config.json").exists() and not (stage_dir / "sub").exists()
    assert manifest["params"] == {"layers": [0]}
    assert _siblings(stage_dir) == ["distill"]                     # no .old- or .tmp- leftovers


def test_stale_temporary_sibling_is_discarded(tmp_path):
    import os

    out = tmp_path / "distill"
    stale = tmp_path / f".distill.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"from a killed run")
    _write(out)
    assert not (out / "junk.bin").exists()
    assert _siblings(out) == ["distill"]
    verify_stage(out)


# --- verification ---------------------------------------------------------------------------

def test_modified_file_same_size(stage_dir):
    path = stage_dir / "config.json"
    data = bytearray(path.read_bytes())
    data[2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StageError, match="checksum mismatch for 'config.json'"):
        verify_stage(stage_dir)


def test_modified_file_in_subfolder_other_size(stage_dir):
    (stage_dir / "sub" / "dir" / "notes.txt").write_text("changed and longer")
    with pytest.raises(StageError, match="sub/dir/notes.txt"):
        verify_stage(stage_dir)


def test_missing_file(stage_dir):
    (stage_dir / "model.safetensors").unlink()
    with pytest.raises(StageError, match="'model.safetensors' listed in the manifest is missing"):
        verify_stage(stage_dir)


def test_extra_file(stage_dir):
    (stage_dir / "sub" / "smuggled.py").write_text("print('hi')")
    with pytest.raises(StageError, match="files not in the manifest: sub/smuggled.py"):
        verify_stage(stage_dir)


@pytest.mark.parametrize("content", ['{"schema": "edgekd.manifest/1", "files": {', "", "\xff\xfe"])
def test_corrupt_manifest_json(stage_dir, content):
    (stage_dir / MANIFEST).write_bytes(content.encode("latin-1"))
    with pytest.raises(StageError, match="not valid JSON"):
        verify_stage(stage_dir)


@pytest.mark.parametrize("manifest", [[], {"files": {}}, {"schema": "other/1", "files": {}},
                                      {"schema": SCHEMA, "stage": "distill"}])
def test_manifest_that_is_not_an_edgekd_manifest(stage_dir, manifest):
    (stage_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="not an edgekd manifest"):
        verify_stage(stage_dir)


@pytest.mark.parametrize("edit", ["drop", "rename", "other stage"])
def test_an_edited_manifest_fails_its_own_checksum(stage_dir, edit):
    """Found by tests/test_fuzz.py: a manifest whose own checksum was removed used to pass as intact."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    if edit == "drop":
        manifest.pop("manifest_sha256")
    elif edit == "rename":
        manifest["manifest_sha256x"] = manifest.pop("manifest_sha256")
    else:
        manifest["stage"] = "export"
    (stage_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="its own checksum does not match"):
        verify_stage(stage_dir)


def test_no_manifest(tmp_path):
    with pytest.raises(StageError, match="no manifest.json"):
        verify_stage(tmp_path)
    with pytest.raises(StageError, match="no manifest.json"):
        verify_stage(tmp_path / "does-not-exist")


def test_wrong_stage(stage_dir):
    with pytest.raises(StageError, match="holds stage 'distill', expected 'compress'"):
        verify_stage(stage_dir, "compress")


# --- skip decisions and input digests -------------------------------------------------------

def test_is_done_only_for_same_stage_params_and_inputs(stage_dir, tmp_path):
    assert is_done(stage_dir, "distill", dict(reversed(PARAMS.items())), INPUTS)  # key order is irrelevant
    assert not is_done(stage_dir, "distill", {**PARAMS, "temperature": 3.0}, INPUTS)
    assert not is_done(stage_dir, "distill", PARAMS, {"teacher": {**INPUTS["teacher"], "sha256": "cd" * 32}})
    assert not is_done(stage_dir, "distill", PARAMS, {})
    assert not is_done(stage_dir, "compress", PARAMS, INPUTS)
    assert not is_done(tmp_path / "elsewhere", "distill", PARAMS, INPUTS)


def test_is_done_false_after_tampering(stage_dir):
    (stage_dir / "model.safetensors").write_bytes(b"tampered")
    assert not is_done(stage_dir, "distill", PARAMS, INPUTS)


def test_stage_input_digest_follows_file_contents(tmp_path):
    first = _write(tmp_path / "a")
    same = _write(tmp_path / "b")
    changed = _write(tmp_path / "c", files={**FILES, "config.json": b'{"a": 2}\n'})
    manifest, entry = stage_input(first, "distill")
    assert entry == {"path": str(first.resolve()), "sha256": inputs_digest(manifest)}
    assert stage_input(same, "distill")[1]["sha256"] == entry["sha256"]  # creation time does not count
    assert stage_input(changed, "distill")[1]["sha256"] != entry["sha256"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two \u00e9")
    assert path.read_text(encoding="utf-8") == "two \u00e9"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
