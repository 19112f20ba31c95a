"""RUN_DIR/lock: one submitter per run at a time (the lock itself: :mod:`data_tools.lock`).

The lock file (JSON: pid, host, time, what, argv) is created with O_EXCL. A second submitter is
refused with the holder's pid/host/age. A lock whose pid is dead on this host is *stale*; it is
reported as such and broken only with ``--break-lock`` (a lock held by a live process, or by
another host whose processes we cannot see, is never broken silently). So is an empty or garbled
lock file older than a few seconds (its creator died between creating and writing it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from data_tools.lock import LockError, exclusive_lock
from data_tools.lock import holder_alive as lock_holder_alive
from jobs.engine.rundir import RunDir

__all__ = ["LockError", "run_lock", "lock_holder_alive"]


def run_lock(
    run_dir: Path, *, break_lock: bool = False, what: str = "jobs submit"
) -> contextlib.AbstractContextManager[Path]:
    """Hold RUN_DIR/lock for the duration of the block (``with run_lock(run_dir) as path:``).

    Raises:
        LockError: held by a live process, by another host, or stale without ``break_lock``.
    """
    return exclusive_lock(
        RunDir(run_dir).lock,
        what,
        take_over_stale=break_lock,
        busy="another submitter is working on this run",
        stale_fix="pass --break-lock to remove it",
    )
