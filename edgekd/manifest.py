"""Stage directories: atomic writes, `manifest.json` with the sha256 of every file, verification.

A stage is built in a hidden temporary sibling and renamed into place only when
complete, so a killed run never leaves a directory that looks whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from edgekd.errors import StageError

MANIFEST = "manifest.json"
SCHEMA = "edgekd.manifest/1"
RUN_MARKER = ".edgekd-run"  # written first into every run directory: the folder is edgekd's to fill and replace
DIGEST = "manifest_sha256"  # the manifest's own checksum: an edited or damaged manifest is caught too
_TRACKED_PACKAGES = ("edgekd", "torch", "transformers", "executorch", "torchao", "coremltools",
                     "ai-edge-litert", "litert-torch", "ai-edge-quantizer", "tflite-micro", "numpy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest itself."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def stage_key(params: dict, inputs: dict) -> str:
    """What determines a stage's output: its parameters and its inputs' checksums."""
    blob = json.dumps({"params": params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def inputs_digest(manifest: dict) -> str:
    """One checksum for a whole stage directory, from its manifest's file table."""
    blob = json.dumps(manifest["files"], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class StageOutput:
    """The directory a stage is writing; `metrics` and `extra` go into the manifest."""

    def __init__(self, work: Path):
        self.path = work
        self.metrics: dict = {}
        self.extra: dict = {}


@contextlib.contextmanager
def write_stage(out: Path, stage: str, params: dict, inputs: dict | None = None):
    """Yield a StageOutput in a temporary sibling; on success write the manifest and rename.

    `inputs` maps a name to {"path", "sha256"}; together with `params` it forms the
    stage key a rerun compares to decide whether the stage is already done.
    """
    out = Path(out)
    check_out(out, stage)  # the safety net for callers that did not check before their work
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    started = time.time()
    try:
        result = StageOutput(work)
        yield result
        clash = set(result.extra) & {"schema", "stage", "key", "created", "wall_s", "params", "inputs", "metrics",
                                     "versions", "files", DIGEST}
        if clash:  # a programming error: extra fields must not hide the manifest's own
            raise ValueError(f"stage extra fields {sorted(clash)} clash with the manifest's")
        if not is_primary_process():  # under torchrun / accelerate, rank 0 alone publishes the stage
            shutil.rmtree(work)
            return
        manifest = {
            "schema": SCHEMA,
            "stage": stage,
            "key": stage_key(params, inputs or {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.time() - started, 2),
            "params": params,
            "inputs": inputs or {},
            "metrics": result.metrics,
            **result.extra,
            "versions": software_versions(),
            "files": file_table(work),
        }
        manifest[DIGEST] = manifest_digest(manifest)
        atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        if out.exists():
            check_out(out, stage)  # hours may have passed: something else may have been put there meanwhile
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


_REFUSE_FIX = "choose another --out or remove it yourself"


def check_out(out: Path, stage: str) -> None:
    """Refuse an `out` that is not edgekd's to replace: called by every command before any work.

    A stage may replace an absent or empty directory, or a directory whose manifest says it holds the
    same stage and that holds no file the manifest does not list (a damaged stage of ours is replaced;
    a user's file put inside it is not deleted). Anything else, a file at `out` included, is refused.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise StageError(f"--out {out} is not a directory (a file or a link); {_REFUSE_FIX}")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        ours = isinstance(manifest, dict) and manifest.get("schema") == SCHEMA and isinstance(manifest["files"], dict)
    except (OSError, ValueError, RecursionError, KeyError):
        ours = False
    if not ours:
        raise StageError(f"--out {out} is a folder edgekd did not write (no edgekd {MANIFEST}); {_REFUSE_FIX}")
    if manifest.get("stage") != stage:
        raise StageError(f"--out {out} holds an edgekd '{manifest.get('stage')}' stage, not '{stage}'; {_REFUSE_FIX}")
    foreign = sorted(set(_relative_files(out)) - set(manifest["files"]) - {MANIFEST})
    if foreign:
        raise StageError(f"--out {out} holds files edgekd did not write ({', '.join(foreign[:3])}); {_REFUSE_FIX}")


def _relative_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def check_run_dir(out: Path) -> None:
    """Refuse a run directory edgekd did not create: it must be absent, empty or an edgekd run directory."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise StageError(f"--out {out} is not a directory (a file or a link); {_REFUSE_FIX}")
    if out.exists() and any(out.iterdir()) and not _is_run_dir(out):
        raise StageError(f"--out {out} is a non-empty folder that is not an edgekd run directory (no {RUN_MARKER}); "
                         f"{_REFUSE_FIX}")


def _is_run_dir(out: Path) -> bool:
    if (out / RUN_MARKER).is_file():
        return True
    try:  # a run written before the marker existed: its recipe and a finetune stage of ours
        return (out / "recipe.yaml").is_file() and read_manifest(out / "finetune", "finetune") is not None
    except StageError:
        return False


def claim_run_dir(out: Path) -> None:
    """Check `out` as a run directory, create it and mark it as edgekd's."""
    check_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_MARKER, "edgekd run directory: edgekd writes and replaces what is in it\n")


def check_zip_out(path: Path, folder_name: str) -> None:
    """Refuse to replace a zip at `path` unless it is an edgekd bundle zip of folder `folder_name`."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            manifest = json.loads(zf.read(f"{folder_name}/{MANIFEST}"))
        ours = (manifest.get("schema") == SCHEMA and manifest.get("stage") == "bundle"
                and all(n.startswith(f"{folder_name}/") for n in names))
    except (OSError, ValueError, KeyError, RecursionError, zipfile.BadZipFile, AttributeError):
        ours = False
    if path.is_symlink() or not ours:
        raise StageError(f"{path} exists and is not an edgekd bundle zip; {_REFUSE_FIX}")


def is_primary_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` job, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's content without its own digest, in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    canonical = json.loads(json.dumps(body, default=str))  # what a reader gets back from the file
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _shape_problem(manifest: dict) -> str | None:
    """What is structurally wrong with a parsed manifest (wrong types, unsafe file names), or None."""
    for key, kind in (("stage", str), ("key", str), ("params", dict), ("inputs", dict), ("metrics", dict),
                      ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a {'string' if kind is str else 'mapping'}"
    for rel, entry in manifest["files"].items():
        parts = rel.replace("\\", "/").split("/")
        if not rel or "\x00" in rel or rel.startswith("/") or ".." in parts or rel == MANIFEST:
            return f"file name {rel[:80]!r} is not a path inside the stage directory"
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and
                type(entry.get("size")) is int and entry["size"] >= 0):
            return f"the entry of {rel[:80]!r} is not {{sha256, size}}"
    return None


def read_manifest(path: Path, stage: str | None = None) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise StageError(f"{path} is not an edgekd stage directory (no {MANIFEST}); "
                         f"create it with the edgekd command of that stage")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, numbers too long, nesting too deep
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise StageError(f"{file} is not valid JSON ({reason}); rerun the stage that wrote it") from None
    except OSError as exc:
        raise StageError(f"{file} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "files" not in manifest:
        raise StageError(f"{file} is not an edgekd manifest (schema {SCHEMA}); rerun the stage that wrote it")
    problem = _shape_problem(manifest)
    if problem is None and manifest.get(DIGEST) != manifest_digest(manifest):  # absent: edited out
        problem = "its own checksum does not match: it was edited or damaged after the stage wrote it"
    if problem:
        raise StageError(f"{file} is damaged: {problem}; rerun the stage that wrote it")
    if stage and manifest.get("stage") != stage:
        raise StageError(f"{path} holds stage '{manifest.get('stage')}', expected '{stage}'")
    return manifest


def verify_stage(path: Path, stage: str | None = None) -> dict:
    """Re-check every checksum of a stage directory; return its manifest or raise StageError."""
    path = Path(path)
    manifest = read_manifest(path, stage)
    listed = manifest["files"]
    for rel, entry in listed.items():
        file = path / rel
        try:
            if not file.is_file():
                raise StageError(f"{path}: file '{rel[:120]}' listed in the manifest is missing; rerun the stage")
            if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
                raise StageError(f"{path}: checksum mismatch for '{rel[:120]}' (the file changed after the stage "
                                 f"wrote it); rerun the stage")
        except OSError as exc:  # unreadable, or a name the file system cannot hold
            raise StageError(f"{path}: cannot read '{rel[:120]}' listed in the manifest ({exc.strerror or exc}); "
                             f"rerun the stage") from None
    extra = set(file_table(path)) - set(listed)
    if extra:
        raise StageError(f"{path}: files not in the manifest: {', '.join(sorted(extra)[:5])}; rerun the stage")
    return manifest


def stage_input(path: Path, stage: str) -> tuple[dict, dict]:
    """Verify an input stage and return (manifest, the {"path", "sha256"} entry for the consumer)."""
    manifest = verify_stage(path, stage)
    return manifest, {"path": str(Path(path).resolve()), "sha256": inputs_digest(manifest)}


def is_done(out: Path, stage: str, params: dict, inputs: dict) -> bool:
    """True when `out` holds a verified stage with the same key (a rerun can skip it)."""
    try:
        manifest = verify_stage(out, stage)
    except StageError:
        return False
    return manifest.get("key") == stage_key(params, inputs)
