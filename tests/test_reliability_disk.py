"""Reliability (issue #10, item 4): the disk fills up during a checkpoint write.

The real case mounts a small tmpfs on the run's checkpoint directory (root only: CI runs as root;
skipped with the reason otherwise), sized so that one more checkpoint fits and the next does not.
The training must fail with exit 1 and a message naming the disk-full condition, the path and the
fix; the previous checkpoints stay valid and no temp file is left; once there is room again the same
command resumes from the newest checkpoint and finishes. Two small cases without root check the same
message and clean-up by faking ENOSPC in the payload write and in the sidecar write.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import torch

import jobs.engine.checkpoint as ck
from jobs.config import load_cfg
from jobs.engine import metrics
from jobs.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import MetricsLog, MetricsWriteError, read_events
from jobs.engine.trainer import run_training
from tests.helpers import stop_at

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--set", "train.steps=30", "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=3"]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at tmp_path/run/stage_01/train/checkpoints (resized by the test), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a small tmpfs (CI runs as root)")
    mnt = tmp_path / "run" / "stage_01" / "train" / "checkpoints"
    mnt.mkdir(parents=True)
    proc = _mount("-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (no CAP_SYS_ADMIN in this container?): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _train(config: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "jobs", "train", "--config", str(config), "--stage", "1", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*argv, "--no-eval", *ARGS], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_disk_full_during_checkpoint_write(small_tmpfs: Path, tiny_config: Path) -> None:
    run_dir = small_tmpfs.parents[2]
    cfg = load_cfg(tiny_config, [a for a in ARGS if a != "--set"])
    first = run_training(cfg, 1, run_dir, DistEnv(), should_stop=stop_at(5))  # step_00000005.pt on the tmpfs
    assert first.status == "preempted" and first.step == 5
    size = (small_tmpfs / "step_00000005.pt").stat().st_size
    used = shutil.disk_usage(small_tmpfs).used
    # room for exactly one more checkpoint (step 10) and half of the next one (step 15)
    limit = used + size + 2 * 4096 + size // 2
    proc = _mount("-o", f"remount,size={limit}", str(small_tmpfs))
    assert proc.returncode == 0, proc.stderr

    failed = _train(tiny_config, run_dir)
    assert failed.returncode == 1, failed.stderr[-3000:]
    err = failed.stderr
    assert "resumed from" in err and "at step 5" in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    print(f"disk full: tmpfs {limit} bytes, checkpoint {size} bytes; message: {line}")
    assert "disk full" in line and "No space left on device" in line
    assert str(small_tmpfs / "step_00000015.pt") in line and "MiB free" in line
    assert f"a checkpoint needs about {size / 2**20:.1f} MiB" in line
    assert "Free space" in line and "re-run the same command to resume" in line
    assert "Traceback" not in err
    # the previous checkpoints are intact and verify; nothing half-written is left
    assert [s for s, _ in list_checkpoints(small_tmpfs)] == [5, 10]
    assert [load_checkpoint(p)["step"] for _, p in list_checkpoints(small_tmpfs)] == [5, 10]
    assert not [p.name for p in small_tmpfs.iterdir() if p.name.endswith(".tmp")]

    proc = _mount("-o", "remount,size=16m", str(small_tmpfs))  # space freed: the same command resumes
    assert proc.returncode == 0, proc.stderr
    done = _train(tiny_config, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resumed from \S+step_00000010\.pt at step 10", done.stderr)
    assert load_checkpoint(run_dir / "stage_01" / "train" / "final.pt")["step"] == 30


PAYLOAD = {"format": "growclip-checkpoint", "version": 1, "step": 3, "w": torch.arange(1000.0)}


def test_enospc_in_payload_write_is_clear_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint({**PAYLOAD, "step": 2}, tmp_path / "step_00000002.pt")
    real_save = torch.save

    def full_disk(obj, f) -> None:  # type: ignore[no-untyped-def]
        real_save(obj, f)  # some bytes reach the temp file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "step_00000003.pt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(PAYLOAD, target)
    msg = str(info.value)
    assert "disk full (ENOSPC" in msg and str(target) in msg and "MiB free" in msg and "Free space" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.pt", "step_00000002.pt.sha256"]
    assert load_checkpoint(tmp_path / "step_00000002.pt")["step"] == 2


def test_enospc_in_sidecar_write_removes_the_unverifiable_pt(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def full_disk(path, text) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(ck, "atomic_write_text", full_disk)
    with pytest.raises(CheckpointError, match=r"disk full \(EDQUOT.*step_00000003\.pt"):
        save_checkpoint(PAYLOAD, tmp_path / "step_00000003.pt")
    assert list(tmp_path.iterdir()) == []


def test_torn_temp_files_are_removed_by_the_next_save_and_prune(tmp_path: Path) -> None:
    """A writer killed mid-write leaves ``.NAME.XXXX.tmp``; the next save of NAME and every prune delete it."""
    for name in (".step_00000003.pt.ab12cd.tmp", ".step_00000001.pt.sha256.x.tmp", ".final.pt.zz.tmp"):
        (tmp_path / name).write_bytes(b"torn")
    save_checkpoint(PAYLOAD, tmp_path / "step_00000003.pt")
    assert (tmp_path / ".step_00000001.pt.sha256.x.tmp").exists() and (tmp_path / ".final.pt.zz.tmp").exists()
    assert not (tmp_path / ".step_00000003.pt.ab12cd.tmp").exists()
    ck.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".final.pt.zz.tmp",
        "step_00000003.pt",
        "step_00000003.pt.sha256",
    ]
    save_checkpoint(PAYLOAD, tmp_path / "final.pt")
    assert not (tmp_path / ".final.pt.zz.tmp").exists()


def _fill(directory: Path) -> Path:
    """Write a filler file in ``directory`` until its filesystem is full; return the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0")
    return filler


def test_metrics_log_on_a_full_disk_is_clear_and_leaves_no_torn_line(small_tmpfs: Path) -> None:
    log = MetricsLog(small_tmpfs)
    log.event("start", stage=1)
    log.step(step=1, samples=8, loss=2.0)
    before = log.events_path.read_bytes()
    filler = _fill(small_tmpfs)  # events.jsonl's page still has room for part of a record: a torn write
    with pytest.raises(MetricsWriteError) as info:
        log.event("checkpoint", step=2, path="x" * 20_000)
    msg = str(info.value)
    print(f"metrics on a full disk: {msg}")
    assert str(log.events_path) in msg and "ENOSPC" in msg and "MiB free" in msg and "re-run the same command" in msg
    assert log.events_path.read_bytes() == before, "the failed append must leave the log as it was"
    filler.unlink()
    log.event("end", step=2)
    kinds = [e["event"] for e in read_events(log.events_path)]
    assert kinds[:2] == ["start", "train"] and kinds[-1] == "end" and "checkpoint" not in kinds


def test_metrics_append_failure_is_undone(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    log = MetricsLog(tmp_path)
    log.event("start", stage=1)
    before = log.events_path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data) -> int:  # type: ignore[no-untyped-def]
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(MetricsWriteError, match=r"EDQUOT.*left as it was.*re-run the same command"):
        log.event("checkpoint", step=2)
    monkeypatch.undo()
    assert log.events_path.read_bytes() == before

    def fstat_fails(fd: int):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(metrics.os, "fstat", fstat_fails)  # before the old end is known: nothing may be cut
    with pytest.raises(MetricsWriteError, match=r"EIO.*check the filesystem"):
        log.event("checkpoint", step=2)
    monkeypatch.undo()
    assert log.events_path.read_bytes() == before


def test_a_line_torn_by_sigkill_costs_only_itself(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.event("start", stage=1)
    with open(log.events_path, "a") as fh:
        fh.write('{"event": "train", "step": 1, "lo')  # the process died mid-line
    log.event("resume", step=0)
    assert [e["event"] for e in read_events(log.events_path)] == ["start", "resume"]


def test_hdf5_that_cannot_be_written_does_not_stop_training(tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    log = MetricsLog(tmp_path)
    log.step(step=1, samples=8, loss=2.0)

    def no_room(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.h5py, "File", no_room)
    log.step(step=2, samples=16, loss=1.9)  # JSONL written; HDF5 append and rebuild fail: warned, not raised
    log.truncate_after(2)  # a resume while the disk is still full: the same
    monkeypatch.undo()
    assert [e["step"] for e in read_events(log.events_path)] == [1, 2]
    assert caplog.text.count("metrics.h5 not rebuilt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "metrics.h5"]
    monkeypatch.setattr(metrics, "H5_RETRY_EVERY", 3)
    for step in (3, 4):  # not appended to the stale HDF5 (its rows would be misaligned)
        log.step(step=step, samples=8 * step, loss=1.8)
    with h5py.File(log.h5_path) as f:
        assert list(f["step"][:]) == [1.0]
    log.step(step=5, samples=40, loss=1.7)  # the 3rd record since: a rebuild is tried, and there is room now
    with h5py.File(log.h5_path) as f:
        assert list(f["step"][:]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    log.truncate_after(4)  # what resume does: cut back and rebuilt
    with h5py.File(log.h5_path) as f:
        assert list(f["step"][:]) == [1.0, 2.0, 3.0, 4.0]


def test_disk_full_inside_torch_save_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer turns the file's ENOSPC into RuntimeError("unexpected pos"): still "disk full"."""
    import contextlib
    import errno

    import torch

    from jobs.engine import checkpoint

    class Full:
        def __init__(self) -> None:
            self.n = 0

        def write(self, data: bytes) -> int:
            if self.n + len(data) > 5000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(data)
            return len(data)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(checkpoint, "atomic_open", lambda path, mode: contextlib.nullcontext(Full()))
    with pytest.raises(checkpoint.CheckpointError, match=r"disk full \(ENOSPC: No space left on device\)"):
        checkpoint.save_checkpoint({"w": torch.zeros(100_000)}, tmp_path / "step_00000001.pt")


def test_a_series_new_to_an_existing_hdf5_stays_aligned(tmp_path: Path) -> None:
    """A metrics.h5 begun before a series existed (or before a stage mixed in): the new series gets NaN rows."""
    log = MetricsLog(tmp_path)
    log.step(step=1, samples=8, loss=2.0, stage_mix={"1": 1.0})
    with h5py.File(log.h5_path, "a") as f:
        del f["val_loss_refit"]  # as written by a version without it
    log.step(step=2, samples=16, loss=1.9, val_loss=1.5, val_loss_refit=1.4, stage_mix={"1": 0.5, "2": 0.5})
    with h5py.File(log.h5_path) as f:
        assert list(f["step"][:]) == [1.0, 2.0]
        assert math.isnan(f["val_loss_refit"][0]) and f["val_loss_refit"][1] == 1.4
        assert math.isnan(f["stage_mix/stage_02"][0]) and f["stage_mix/stage_02"][1] == 0.5
