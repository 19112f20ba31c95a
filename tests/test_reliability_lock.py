"""Reliability (issue #10, item 5): two ``submit`` on one run, and a stale lock left by a dead submitter.

A real submitter process (debug executor: it trains stage 1 in-process while holding RUN_DIR/lock)
is running when a second ``submit`` of the same run comes: the second is refused, ``--break-lock``
included (a live holder is never broken). The first is then SIGKILLed: its lock stays behind, is
reported as stale (by ``submit`` and ``status``) and is broken only with ``--break-lock``; that
submission resumes the killed training from its checkpoint and finishes the stage. Unit cases: a
lock from another host is never broken; an empty lock file (its creator died between creating and
writing it) is stale once it is a few seconds old. ``DATA_ROOT/.lock`` (ingest, ``validate --repair``) is the
same O_EXCL lock (issue #16): it names its holder, is taken over from a writer that died on this host (or
left empty and old by the former flock lock), and says how to clear one held on another host. Every process
is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.manifest import writer_lock
from jobs.cli import main as jobs_main
from jobs.engine.metrics import read_events
from jobs.runlock import LockError, run_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GROWCLIP_LOG_LEVEL": "WARNING"}

pytestmark = pytest.mark.usefixtures("restore_root_logging")


def _wait(what: str, cond, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        if value := cond():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _submit_in_process(args: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    rc = jobs_main(args)
    return rc, capsys.readouterr().err


def test_second_submitter_refused_then_stale_lock_broken(  # type: ignore[no-untyped-def]
    tiny_pipeline_config: Path, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    lock, td = run_dir / "lock", run_dir / "stage_01" / "train"
    args = ["submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1"]
    args += ["--executor", "debug", "--set", "train.steps=300", "--set", "train.checkpoint_every=10"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed in finally); a full pipe would stall the child
    first = subprocess.Popen([sys.executable, "-m", "jobs", *args], cwd=REPO, env=ENV, stdout=log, stderr=log)
    try:
        _wait("the first submitter to take the lock", lock.exists)
        holder = json.loads(_wait("the lock's content", lambda: lock.read_text()))
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        def trained_steps() -> int:
            if not (td / "events.jsonl").exists():
                return 0
            return max((e["step"] for e in read_events(td / "events.jsonl") if e["event"] == "train"), default=0)

        _wait("the first submitter to pass its step-10 checkpoint", lambda: trained_steps() > 10 or first.poll())
        assert first.poll() is None, f"the first submission ended early: {(tmp_path / 'first.log').read_text()[-2000:]}"
        # a second submitter on the same run is refused, and --break-lock does not break a live holder
        for extra in ([], ["--break-lock"]):
            rc, err = _submit_in_process(args + extra, capsys)
            assert rc == 2 and "another submitter is working on this run" in err, err
            assert f"pid {first.pid} on {socket.gethostname()}" in err
        assert first.poll() is None, "the first submitter must still hold the lock during the second submission"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert lock.exists() and json.loads(lock.read_text())["pid"] == first.pid  # left behind by the dead process
    rc, err = _submit_in_process(args, capsys)
    assert rc == 2 and "is stale" in err and "that process is gone" in err and "--break-lock" in err, err
    rc = jobs_main(["status", str(run_dir)])
    assert rc == 0 and f"lock: pid {first.pid} on {socket.gethostname()} (stale)" in capsys.readouterr().out
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", *args, "--break-lock"], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not lock.exists()
    resumes = [e["step"] for e in read_events(td / "events.jsonl") if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0] >= 10  # the killed training went on from its checkpoint
    assert (td / "final.pt").exists() and (run_dir / "stage_01" / "eval" / "metrics.json").exists()
    print(f"lock: stale lock broken, stage 1 resumed at step {resumes[0]} and finished in {time.time() - t0:.1f} s")


def test_lock_of_another_host_is_never_broken(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text(json.dumps({"pid": 1, "host": "other-node-17", "time": time.time() - 60}))
    for flag in (False, True):
        with pytest.raises(LockError, match=r"pid 1 on other-node-17") as info, run_lock(tmp_path, break_lock=flag):
            pass
        assert ("delete" in str(info.value)) == flag  # with --break-lock: says how to check and remove it
    assert lock.exists()


def test_lock_of_an_ended_slurm_job_is_stale_on_any_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock taken inside SLURM job 41 on another node: stale once squeue answers without job 41 (SLURM ended its
    processes); held while squeue lists it or does not answer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "lock"
    lock.write_text(json.dumps({"pid": 1, "host": "other-node-17", "time": time.time(), "job": "41"}))
    for listing, rc in (("41\n42\n", 0), ("", 1)):  # job 41 still queued; slurmctld not answering
        squeue.write_text(f"#!/bin/sh\nprintf '{listing}'\nexit {rc}\n")
        squeue.chmod(0o755)
        with pytest.raises(LockError, match="another host"), run_lock(run, break_lock=True):
            pass
    squeue.write_text("#!/bin/sh\nprintf '42\\n'\n")
    with pytest.raises(LockError, match=r"in job 41, which has ended.*--break-lock"), run_lock(run):
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    with run_lock(run, break_lock=True) as path:
        assert json.loads(path.read_text())["job"] == "43"  # the next holder records its own job
    assert not lock.exists()


def test_empty_lock_file_is_stale_once_old(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")  # the creator died between O_EXCL and the write
    with pytest.raises(LockError, match="being created"), run_lock(tmp_path, break_lock=True):
        pass
    old = time.time() - 120
    os.utime(lock, (old, old))
    with pytest.raises(LockError, match=r"stale \(unreadable.*--break-lock"), run_lock(tmp_path):
        pass
    with run_lock(tmp_path, break_lock=True) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ------------------------------------------ DATA_ROOT/.lock: the same O_EXCL lock (data_tools.lock, issue #16)
def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_writer_lock_names_its_holder_and_releases(tmp_path: Path) -> None:
    lock = tmp_path / "root" / ".lock"
    with writer_lock(tmp_path / "root", "ingest"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "ingest"
        busy = r"\(ingest, since \d+ s ago\).*another ingest or repair.*validate"
        with pytest.raises(RuntimeError, match=busy), writer_lock(tmp_path / "root", "validate --repair"):
            pass
        assert json.loads(lock.read_text()) == holder  # the refused writer left the holder's lock alone
    assert not lock.exists()


def test_writer_lock_takes_over_a_dead_writer_on_this_host(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    dead = _exited_pid()
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "time": time.time(), "what": "ingest"}))
    with writer_lock(tmp_path, "ingest"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text("")  # an empty DATA_ROOT/.lock, as the flock implementation left behind after every run
    old = time.time() - 120
    os.utime(lock, (old, old))
    with writer_lock(tmp_path, "ingest"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_writer_lock_of_another_host_says_how_to_clear_it(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 7, "host": "other-node-17", "time": time.time() - 60, "what": "ingest"}))
    with pytest.raises(LockError) as info, writer_lock(tmp_path, "validate --repair"):
        pass
    msg = str(info.value)
    assert re.search(r"pid 7 on other-node-17 \(ingest, since 6\d s ago\)", msg), msg
    assert "another ingest or repair" in msg and f"delete {lock} by hand" in msg, msg
    assert lock.exists()


def test_lock_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    with run_lock(tmp_path) as path:
        path.write_text(json.dumps({"pid": 1, "host": "other-node-17", "time": time.time()}))  # broken by hand, retaken
    assert json.loads(path.read_text())["host"] == "other-node-17"
