"""RUN_DIR/lock: one submitter per run at a time (the lock itself: :mod:`data_tools.lock`).

The lock file (JSON: pid, host, time, what, argv) is created with O_EXCL. A second submitter is
refused with the holder's pid/host/age. A lock whose pid is dead on this host is *stale*; it is
reported as such and broken only with ``--break-lock`` (a lock held by a live process, or by
another host whose processes we cannot see, is never broken silently). So is an empty or garbled
lock file older than a few seconds (its creator died between creating and writing it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_tools.lock import LockError, exclusive_lock, holder_alive
from jobs.engine.rundir import RunDir

__all__ = ["LockError", "run_lock", "lock_holder_alive", "slurm_job_ended"]


def run_lock(
    run_dir: Path, *, break_lock: bool = False, what: str = "jobs submit"
) -> contextlib.AbstractContextManager[Path]:
    """Hold RUN_DIR/lock for the duration of the block (``with run_lock(run_dir) as path:``).

    Inside a SLURM job the lock records the job (``job``): once squeue no longer lists it, the lock is stale on any
    host (SLURM has ended the job's processes), e.g. that of an autopilot poll killed on another node.

    Raises:
        LockError: held by a live process, by another host, or stale without ``break_lock``.
    """
    return exclusive_lock(
        RunDir(run_dir).lock,
        what,
        take_over_stale=break_lock,
        busy="another submitter is working on this run",
        stale_fix="pass --break-lock to remove it",
        job=os.environ.get("SLURM_JOB_ID") or None,
        job_ended=slurm_job_ended,
    )


def slurm_job_ended(job_id: str) -> bool:
    """Whether squeue answers and no longer lists SLURM job ``job_id`` (False when it cannot tell)."""
    from jobs.cluster import queued_ids

    ids = queued_ids()  # one squeue call
    return ids is not None and job_id not in ids


def lock_holder_alive(info: Mapping[str, Any]) -> bool | None:
    """Whether the holder of a RUN_DIR/lock record lives: True/False, None when it cannot be told."""
    return holder_alive(info, slurm_job_ended)
