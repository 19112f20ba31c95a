"""Regular files only: how every input file and every image file is opened.

Files are only read if they are regular files (opened with ``O_NONBLOCK`` and checked with
``fstat``, so a FIFO or a device never blocks) and at most ``ImageOptions.max_file_bytes`` long.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from data_tools.imaging import Dropped

_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_fd(path: str | os.PathLike[str]) -> int | Dropped:
    """An fd of a regular file, opened without blocking, or why not (nothing else is ever opened)."""
    try:
        # stat first: a device is not even opened (opening some devices has side effects)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return Dropped("not_regular_file", f"{path} is {_kind(st.st_mode)}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return Dropped("missing_file", str(path))
    except (ValueError, UnicodeError) as exc:  # a NUL byte, a lone surrogate: not a path at all
        return Dropped("invalid_path", str(exc))
    except OSError as exc:
        return Dropped("read_error", f"{path}: {exc.strerror or exc}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        return Dropped("not_regular_file", f"{path} is {_kind(st.st_mode)}")
    return fd


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes | Dropped:
    """The bytes of a regular file of at most ``max_bytes`` bytes, or why it is not read.

    Never blocks: a FIFO, socket, device or directory is ``not_regular_file``; a missing file
    ``missing_file``; a NUL byte or lone surrogate in the path ``invalid_path``; a longer file
    ``file_too_large``; an I/O error ``read_error``.
    """
    fd = _open_fd(path)
    if isinstance(fd, Dropped):
        return fd
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            return Dropped("file_too_large", f"{size} bytes > max_file_bytes={max_bytes}")
        chunks, total = [], 0
        while chunk := os.read(fd, min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew after fstat
                return Dropped("file_too_large", f"more than max_file_bytes={max_bytes} bytes")
        return b"".join(chunks)
    except OSError as exc:
        return Dropped("read_error", f"{path}: {exc.strerror or exc}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_input(path: Path) -> Iterator[BinaryIO]:
    """Open a table or tar of the input (binary). Input-level problems raise ValueError."""
    fd = _open_fd(path)
    if isinstance(fd, Dropped):
        what = f"{path} does not exist" if fd.reason == "missing_file" else fd.detail
        raise ValueError(f"{what}; --input must be a regular file (a table or tar) or a directory of them")
    with os.fdopen(fd, "rb") as fh:
        yield fh
