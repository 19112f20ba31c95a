"""RUN_DIR/lock: one submitter per run at a time.

The lock file (JSON: pid, host, time, command) is created with O_EXCL. A second submitter is
refused with the holder's pid/host/age. A lock whose pid is dead on this host is *stale*; it is
reported as such and broken only with ``--break-lock`` (a lock held by a live process, or by
another host whose processes we cannot see, is never broken silently). So is an empty or garbled
lock file older than a few seconds (its creator died between creating and writing it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LockError", "run_lock", "lock_holder_alive"]


_BEING_WRITTEN_S = 10.0  # an unreadable lock younger than this may still be being written by its creator


class LockError(RuntimeError):
    """Another submitter holds the run's lock (or a stale lock needs --break-lock)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder_alive(info: dict) -> bool | None:
    """True/False for a lock taken on this host; None when taken on another host (unknown)."""
    if info.get("host") != socket.gethostname():
        return None
    return _alive(int(info.get("pid", -1)))


@contextlib.contextmanager
def run_lock(run_dir: Path, *, break_lock: bool = False) -> Iterator[Path]:
    """Hold RUN_DIR/lock for the duration of the block.

    Raises:
        LockError: held by a live process, by another host, or stale without ``break_lock``.
    """
    path = Path(run_dir) / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "argv": sys.argv})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                info = {}
            if not isinstance(info, dict) or "pid" not in info:
                # empty/garbled: its creator died between O_EXCL and the write (or is writing it right now)
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # removed meanwhile: try again
                if age < _BEING_WRITTEN_S:
                    raise LockError(f"{path} is being created by another submitter ({age:.1f} s ago)") from None
                if not break_lock:
                    raise LockError(
                        f"{path} is stale (unreadable, {age:.0f} s old: its submitter died while creating it); "
                        "pass --break-lock to remove it"
                    ) from None
                path.unlink(missing_ok=True)
                continue
            alive = lock_holder_alive(info)
            age = time.time() - float(info.get("time", time.time()))
            who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {age:.0f} s ago"
            if alive is False and break_lock:
                path.unlink(missing_ok=True)
                continue
            if alive is False:
                raise LockError(
                    f"{path} is stale ({who}, that process is gone); pass --break-lock to remove it"
                ) from None
            if alive is None and break_lock:
                raise LockError(
                    f"{path} is held by {who}: another host, cannot tell whether it is alive; check there, "
                    f"then delete {path} by hand"
                ) from None
            raise LockError(f"{path} is held by {who}: another submitter is working on this run") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:  # broken, then taken again by someone else before us
        raise LockError(f"{path} was re-created by another submitter while the stale lock was being broken")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
