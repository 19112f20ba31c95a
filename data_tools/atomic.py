"""Atomic file writes for files that another job reads (DESIGN.md "On disk").

A reader on a shared filesystem (Lustre, NFS) must see either the old file or the complete new one,
never a prefix. So: write to a temporary name in the SAME directory (rename is atomic only within a
filesystem), flush and fsync the data, ``os.replace`` it over the target, then fsync the directory so
the rename itself survives a crash. If anything fails the temporary file is removed and the target
is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "free_space",
    "fsync_dir",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it are durable (best effort where not supported)."""
    _fsync_dir(Path(directory))


def free_space(directory: str | os.PathLike[str]) -> str:
    """``"12.3 MiB free"`` on the filesystem of ``directory`` (for disk-full messages), or ``"free space unknown"``."""
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on clean exit it atomically replaces ``path``.

    Args:
        path: final destination; its parent directory is created if missing.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    Raises:
        ValueError: for a mode other than ``"wb"``/``"w"``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode={mode!r}: use 'wb' or 'w'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; other users' jobs on a shared filesystem must read the file like any
        # file this process creates with open(), i.e. 0666 minus the umask.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (sorted keys, trailing newline) to ``path``."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on clean exit it becomes ``path`` (one rename).

    Every file written into it is fsynced before the rename. On an error the temp folder is removed and
    ``path`` is untouched. With ``replace`` an existing non-empty folder is swapped: renamed aside, the new
    one renamed in, the old one deleted (a reader sees the old or the new folder, never a mix).

    Raises:
        FileExistsError: ``path`` is a file, or a non-empty folder without ``replace``.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder")
    if target.exists() and not replace and not _is_empty_dir(target):
        raise FileExistsError(f"{target} is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; others' jobs must read it like any folder
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(tmp)
        if replace and target.is_dir() and not _is_empty_dir(target):
            aside = Path(f"{tmp}.old")
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)  # rename(2) replaces an empty folder and refuses a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
