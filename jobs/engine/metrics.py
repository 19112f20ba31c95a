"""Training metrics: ``events.jsonl`` (source of truth) and ``metrics.h5`` (one appendable dataset per series).

Every record is one JSON line ``{"event": ..., "time": ..., ...}``. Step records
(``event == "train"``) carry the series below; ``metrics.h5`` holds the same series as 1-D float64
datasets (``maxshape=(None,)``), one row per step record, so ``h5py.File(p)["loss"][:]`` plots directly.
The observed share of samples per stage over the log interval is stored as ``stage_mix/stage_NN``
(``stage_mix_target`` in the JSONL holds the configured replay weights).

On resume both files are cut back to the resumed step: ``events.jsonl`` is rewritten atomically
without step records beyond it (their steps are about to be redone), and ``metrics.h5`` is rebuilt
from it. The HDF5 file is reopened and closed around every append, so a SIGKILL can at worst lose it,
never the JSONL; a metrics.h5 that fails to open is rebuilt from the JSONL.

Appends to ``events.jsonl`` never leave a torn line behind: a write that fails (disk full, quota) is cut
back to the file's previous end and raises :class:`MetricsWriteError` naming the path, the free space and
the fix; a line torn by a SIGKILL is closed with a newline before the next record, so that it costs only
itself (``read_events`` skips it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from data_tools.atomic import atomic_write_text, free_space
from jobs.engine.rundir import EVENTS, METRICS_H5

__all__ = ["SERIES", "MetricsLog", "MetricsWriteError", "read_events"]

logger = logging.getLogger(__name__)

# Per-step series: (name, meaning). Units: lr absolute, samples/s global, memory in MiB.
SERIES = (
    ("step", "optimizer steps done"),
    ("samples", "samples seen (global)"),
    ("loss", "contrastive loss, mean over the step's micro-batches"),
    ("lr", "learning rate of the first parameter group"),
    ("samples_per_s", "global training throughput over the last log interval"),
    ("grad_norm", "global grad norm before clipping"),
    ("logit_scale", "exp(logit_scale), the inverse temperature"),
    ("memory_mb", "peak CUDA memory allocated (GPU) or peak RSS (CPU), MiB"),
    ("val_loss", "held-out contrastive loss (train.val_every; NaN between validations)"),
    ("val_loss_se", "its standard error over the held-out batches"),
    ("val_loss_ema", "held-out loss of the EMA weights (train.ema_decay > 0)"),
    ("val_loss_refit", "held-out loss at the temperature re-fitted on the held-out batches"),
)


H5_RETRY_EVERY = 20  # step records between two rebuild attempts of a metrics.h5 that could not be written


class MetricsWriteError(RuntimeError):
    """``events.jsonl`` could not be appended to (disk full, quota, I/O error); the file is left as it was."""


def _write_error(path: Path, exc: OSError, what: str) -> MetricsWriteError:
    """The error for a failed write of the metrics log ``path``: condition, free space, fix."""
    free = f"{free_space(path.parent)} there"
    fix = (
        "free space on that filesystem (or use a --run-dir with room), then re-run the same command to resume "
        "from the last checkpoint"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "check the filesystem, then re-run the same command to resume from the last checkpoint"
    )
    return MetricsWriteError(
        f"could not {what} the metrics log {path} ({errno.errorcode.get(exc.errno or 0, exc.errno)}: "
        f"{exc.strerror}; {free}); the log is left as it was before. Fix: {fix}"
    )


def _append_line(path: Path, line: bytes) -> None:
    """Append ``line`` (ending in a newline) to ``path`` and fsync; on failure cut the file back to its old end."""
    fd, start = -1, -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":  # torn by a SIGKILL: close it, keep ours whole
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        if start >= 0:  # only once the old end is known: never cut what was there before
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
        raise _write_error(path, exc, "append to") from exc
    finally:
        if fd >= 0:
            os.close(fd)


def read_events(path: Path) -> list[dict[str, Any]]:
    """All records of an events.jsonl; a torn last line (SIGKILL mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping an unreadable line (interrupted write?)", path)
    return out


class MetricsLog:
    """Appends records to ``events.jsonl`` and step series to ``metrics.h5`` (rank 0 only).

    Args:
        train_dir: RUN_DIR/stage_NN/train.
        enabled: False on ranks other than 0 (every method is then a no-op).
    """

    def __init__(self, train_dir: Path, enabled: bool = True) -> None:
        self.events_path = train_dir / EVENTS
        self.h5_path = train_dir / METRICS_H5
        self.enabled = enabled
        self._h5_broken, self._records_since_broken = False, 0

    def truncate_after(self, step: int) -> None:
        """Drop step records with ``step > step`` and rebuild metrics.h5 from the JSONL (resume)."""
        if not self.enabled:
            return
        events = read_events(self.events_path)
        kept = [e for e in events if not (e.get("event") == "train" and e.get("step", 0) > step)]
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept)
        try:
            atomic_write_text(self.events_path, text)
        except OSError as exc:  # the temp file is gone; events.jsonl is untouched
            raise _write_error(self.events_path, exc, "rewrite") from exc
        self._try_rebuild_h5([e for e in kept if e.get("event") == "train"])
        if len(kept) != len(events):
            logger.info(
                "metrics: dropped %d step records after step %d (redone on resume)", len(events) - len(kept), step
            )

    def _try_rebuild_h5(self, records: list[dict[str, Any]]) -> None:
        """Rebuild metrics.h5 from ``records``; on failure warn and stop appending to it until a rebuild works."""
        try:
            self._rebuild_h5(records)
            self._h5_broken = False
        except OSError as exc:  # e.g. the disk is full: events.jsonl has every record, a later rebuild catches up
            self._h5_broken, self._records_since_broken = True, 0
            logger.warning("metrics.h5 not rebuilt (%s): events.jsonl has every record; resume rebuilds it", exc)

    def _rebuild_h5(self, records: list[dict[str, Any]]) -> None:
        tmp = self.h5_path.with_name(f".{self.h5_path.name}.{os.getpid()}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                self._create(f)
                for r in records:
                    self._append(f, r)
            os.replace(tmp, self.h5_path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create(f: h5py.File) -> None:
        rows = f["step"].shape[0] if "step" in f else 0  # a series added since the file was begun: NaN before
        for name, meaning in SERIES:
            if name not in f:
                ds = f.create_dataset(
                    name, shape=(rows,), maxshape=(None,), dtype="f8", chunks=(1024,), fillvalue=np.nan
                )
                ds.attrs["meaning"] = meaning

    @staticmethod
    def _append(f: h5py.File, record: dict[str, Any]) -> None:
        series = {name: record.get(name, float("nan")) for name, _ in SERIES}
        for stage, w in record.get("stage_mix", {}).items():
            series[f"stage_mix/stage_{int(stage):02d}"] = w
        rows = f["step"].shape[0] if "step" in f else 0
        for name, value in series.items():
            if name not in f:  # e.g. a stage's mixing weight from its first record on: NaN before
                f.create_dataset(name, shape=(rows,), maxshape=(None,), dtype="f8", chunks=(1024,), fillvalue=np.nan)
            ds = f[name]
            n = ds.shape[0]
            ds.resize((n + 1,))
            ds[n] = np.nan if value is None else float(value)

    def event(self, kind: str, **fields: Any) -> None:
        """Append one ``{"event": kind, ...}`` line (fsync'ed: other jobs and tests read it)."""
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        _append_line(self.events_path, (json.dumps(record, sort_keys=True) + "\n").encode())

    def step(self, **fields: Any) -> None:
        """A ``train`` record in events.jsonl plus one row in every metrics.h5 series."""
        if not self.enabled:
            return
        self.event("train", **fields)
        if self._h5_broken:  # a rebuild failed: appending to a partial file would misalign the series
            self._records_since_broken += 1
            if self._records_since_broken % H5_RETRY_EVERY == 0:  # the disk may have room again
                self._try_rebuild_h5([e for e in read_events(self.events_path) if e.get("event") == "train"])
            return
        try:
            with h5py.File(self.h5_path, "a") as f:
                self._create(f)
                self._append(f, fields)
        except OSError as exc:  # e.g. left damaged by a SIGKILL mid-write: rebuild from the JSONL
            logger.warning("metrics.h5 unusable (%s): rebuilding it from events.jsonl", exc)
            self._try_rebuild_h5([e for e in read_events(self.events_path) if e.get("event") == "train"])
