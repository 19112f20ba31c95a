"""One writer at a time: a lock file created with ``O_EXCL`` that records who holds it.

Used for ``DATA_ROOT/.lock`` (ingest, ``validate --repair``: :func:`data_tools.manifest.writer_lock`) and
``RUN_DIR/lock`` (``python -m jobs submit``: :mod:`jobs.runlock`). DATA_ROOT and RUN_DIR live on a shared
filesystem, and the processes competing for them run on different nodes.

Why ``O_EXCL`` and not ``flock``: creating a file with ``O_CREAT | O_EXCL`` is atomic on the file
server (NFS v3 and later, Lustre, GPFS, local disks), so of two nodes creating the same lock exactly one
succeeds. ``flock`` is not: Lustre without the ``flock`` mount option either refuses it (``ENOSYS``) or,
with ``localflock``, grants it per node, so two nodes both "hold" it; NFS emulates it with byte-range
locks whose behaviour depends on the client and server versions. The price of ``O_EXCL``: the kernel
does not release the lock when its holder dies. So the file records the holder (pid, host, time, what,
argv), and:

* a lock whose pid is dead on this host is *stale*: taken over (with a warning) when the caller allows
  it (``take_over_stale``), otherwise refused with the caller's fix (e.g. ``--break-lock``);
* a lock taken on another host is never taken over (its processes cannot be checked from here): the
  error names the host and says how to clear it by hand once that process is known to be gone; except
  where the caller records the batch job that holds it (``job``) and says how to tell that job has ended
  (``job_ended``: ``jobs.runlock`` asks squeue): the job's processes are gone, so the lock is stale;
* an empty or garbled lock file is being written by its creator if it is younger than a few seconds,
  and stale (its creator died between creating and writing it) once older.

Two processes taking over the *same* stale lock at the same instant are not fully serialised: each removes
the stale file only if it still holds the bytes it judged stale, which narrows the window to the time
between that re-read and the unlink.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["LockError", "exclusive_lock", "holder_alive", "describe_holder"]

logger = logging.getLogger(__name__)

BEING_WRITTEN_S = 10.0  # an unreadable lock younger than this may still be being written by its creator


class LockError(RuntimeError):
    """The lock is held by someone else (or is stale and may not be taken over); the message says the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


JobEnded = Callable[[str], bool]  # whether the batch job with this id has ended (False when it cannot tell)


def holder_alive(info: Mapping[str, Any], job_ended: JobEnded | None = None) -> bool | None:
    """True/False for a lock taken on this host; for one taken on another host False when its recorded ``job`` has
    ended (``job_ended``), else None (cannot tell)."""
    if info.get("host") != socket.gethostname():
        job = info.get("job")
        return False if job_ended is not None and isinstance(job, str) and job and job_ended(job) else None
    return _pid_alive(int(info.get("pid", -1)))


def describe_holder(info: Mapping[str, Any]) -> str:
    """``pid 123 on node-7 (ingest, since 42 s ago)``."""
    age = time.time() - float(info.get("time", time.time()))
    what = f"{info['what']}, " if info.get("what") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({what}since {age:.0f} s ago)"


def _read(path: Path) -> tuple[bytes, dict[str, Any] | None] | None:
    """``(raw bytes, holder record or None when empty/garbled)``; None when the file is gone."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    return raw, info if isinstance(info, dict) and "pid" in info else None


def _remove_if_unchanged(path: Path, raw: bytes) -> None:
    """Unlink ``path`` only if it still holds ``raw`` (not a lock someone took meanwhile)."""
    now = _read(path)
    if now is not None and now[0] == raw:
        path.unlink(missing_ok=True)


def _refuse_or_take_over(
    path: Path,
    raw: bytes,
    info: dict[str, Any] | None,
    *,
    take_over_stale: bool,
    busy: str,
    stale_fix: str,
    job_ended: JobEnded | None,
) -> None:
    """Raise LockError for a lock we may not take; remove a stale one we may (the caller then retries)."""
    if info is None:  # empty/garbled: its creator died between O_EXCL and the write, or is writing it now
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return  # removed meanwhile: try again
        if age < BEING_WRITTEN_S:
            raise LockError(f"{path} is being created by another process ({age:.1f} s ago); try again in a few seconds")
        if not take_over_stale:
            raise LockError(
                f"{path} is stale (unreadable, {age:.0f} s old: its creator died while creating it); {stale_fix}"
            )
        logger.warning("taking over %s: unreadable and %.0f s old (its creator died while creating it)", path, age)
        _remove_if_unchanged(path, raw)
        return
    who, alive = describe_holder(info), holder_alive(info, job_ended)
    if alive is False and info.get("host") != socket.gethostname():
        who += f", in job {info['job']}, which has ended"
    if alive is True:
        raise LockError(f"{path} is held by {who}: {busy}")
    if alive is None:
        if not take_over_stale:
            raise LockError(f"{path} is held by {who}: {busy}")
        raise LockError(
            f"{path} is held by {who}, another host: {socket.gethostname()} cannot tell whether that process is "
            f"alive. If it is, {busy}; if it is gone (check on {info.get('host', '?')}), delete {path} by hand"
        )
    if not take_over_stale:
        raise LockError(f"{path} is stale ({who}, that process is gone); {stale_fix}")
    logger.warning("taking over stale lock %s (%s, that process is gone)", path, who)
    _remove_if_unchanged(path, raw)


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike[str],
    what: str,
    *,
    take_over_stale: bool = True,
    busy: str = "wait for it to finish",
    stale_fix: str = "remove it by hand",
    job: str | None = None,
    job_ended: JobEnded | None = None,
) -> Iterator[Path]:
    """Hold the lock file ``path`` for the duration of the block; it is removed on exit.

    Args:
        path: the lock file (its folder is created if missing).
        what: what the holder is doing (``"ingest"``), recorded in the file and named in others' errors.
        take_over_stale: take over a lock whose holder is dead on this host, or that is unreadable and
            older than a few seconds. False: refuse it with ``stale_fix``.
        busy: what to do when a live process (or one on another host) holds the lock: the end of the error.
        stale_fix: how to break a stale lock when ``take_over_stale`` is False: the end of the error.
        job: the batch job this process runs in, recorded (``job``) so that other hosts can judge the lock.
        job_ended: tells whether a recorded ``job`` has ended: another host's lock is then stale.

    Yields:
        ``path``, holding this process's record (JSON: pid, host, time, what, argv; job when given).

    Raises:
        LockError: held by a live process or another host, being created, or stale and not taken over;
            the message names the holder (pid, host, what, since when) and the fix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "what": what, "argv": sys.argv}
    body = json.dumps({**record, "job": job} if job else record).encode()
    for _ in range(3):  # a stale lock removed, then (rarely) a lock vanishing between our create and read
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _read(path)
            if found is not None:
                _refuse_or_take_over(
                    path, *found, take_over_stale=take_over_stale, busy=busy, stale_fix=stale_fix, job_ended=job_ended
                )
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:
        raise LockError(f"{path} was re-created by another process while a stale lock was being removed; try again")
    try:
        yield path
    finally:
        found = _read(path)
        if found is not None and found[0] == body:
            path.unlink(missing_ok=True)
        else:  # someone broke our lock by hand (and maybe took it): leave theirs alone
            logger.warning("%s no longer holds this process's record at release; left as it is", path)
