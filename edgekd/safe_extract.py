"""Unpacking a tar or zip archive (a bundle, a downloaded model) without letting it write outside its folder.

Every member is checked before anything is written: no absolute path, no `..`, no link whose target
leaves the folder, nothing but regular files, folders and such links. The archive is unpacked into a
temporary sibling and renamed into place, so a refused or broken archive leaves nothing behind.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from edgekd.errors import StageError


class ArchiveError(StageError):
    """An archive is unreadable, or a member would land outside the folder it is unpacked into."""


def _inside(name: str, base: str = "") -> str:
    """`name` (relative to folder `base` of the archive) normalized, or ArchiveError if it leaves the root."""
    if not name or "\x00" in name:
        raise ValueError("an empty or NUL-containing name")
    text = name.replace("\\", "/")
    if text.startswith("/") or PurePosixPath(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise ValueError(f"absolute path '{name}'")
    joined = posixpath.normpath(posixpath.join(base, text))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise ValueError(f"'{name}' leaves the target folder")
    return joined


def _check_tar(members: list[tarfile.TarInfo]) -> None:
    for member in members:
        _inside(member.name)
        if member.issym():
            _inside(member.linkname, posixpath.dirname(posixpath.normpath(member.name)))
        elif member.islnk():
            _inside(member.linkname)
        elif not (member.isfile() or member.isdir()):
            raise ValueError(f"'{member.name}' is a device, FIFO or other special file")


def _check_zip(infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        _inside(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)  # 0 when the zip records no Unix file type (most zips): a plain file
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise ValueError(f"'{info.filename}' is a link or special file, which zip bundles may not hold")


def safe_extract(archive: Path, target: Path) -> Path:
    """Unpack `archive` (.tar, .tar.gz/.tgz/.tar.bz2/.tar.xz or .zip) into the new folder `target`."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise ArchiveError(f"{target} already exists; remove it or choose another folder to unpack {archive.name} into")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                _check_tar(members)
                work.mkdir()
                # The "data" filter (Python >= 3.11.4) re-checks the same rules and drops set-uid bits.
                tar.extractall(work, members=members, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _check_zip(infos)
                work.mkdir()
                zf.extractall(work)
        else:
            raise ArchiveError(f"{archive} is not a tar or zip archive (or it is truncated); get a fresh copy")
        _check_tree(work)
        work.rename(target)
    except (ValueError, tarfile.FilterError) as exc:  # our checks, and the "data" filter's (link chains)
        shutil.rmtree(work, ignore_errors=True)
        raise ArchiveError(f"{archive} was not unpacked: {exc}; an archive must hold only files under "
                           f"its own folder") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchiveError(f"{archive} could not be unpacked ({first}); it is damaged or truncated, "
                           f"get a fresh copy") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _check_tree(root: Path) -> None:
    """After unpacking: every link still resolves inside `root` (defends against link chains)."""
    real_root = root.resolve()
    for path in root.rglob("*"):
        if path.is_symlink():
            resolved = path.resolve()
            if resolved != real_root and real_root not in resolved.parents:
                raise ValueError(f"link '{path.relative_to(root)}' points outside the target folder")
