"""The autopilot as a recurring SLURM job on the real local cluster (marker ``slurm``; issue #20 item 5): crawls
dropped into the inbox one after another grow the model across two stages with no command between them; the
recurring job is cancelled mid-stage and started again, and nothing is ingested or submitted twice. Waits bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SlurmCluster
from tests.helpers import autopilot_setup, drop_crawl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


def jobs_cli(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cluster.env(), "GROWCLIP_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "autopilot" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_event(run_dir: Path, kind: str, stage: int, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        found = [e for e in events(run_dir) if e["event"] == kind and e.get("stage") == stage]
        if found:
            return found[0]
        time.sleep(1)
    subprocess.run(["scancel", "-n", "growclip-autopilot-autopilot"], check=False)
    raise AssertionError(f"no {kind} event for stage {stage} within {timeout:.0f} s: {events(run_dir)[-5:]}")


def poll_jobs(run_dir: Path) -> dict[str, str]:
    """The run's autopilot poll jobs in squeue: job id -> state."""
    recs = json.loads((run_dir / "autopilot" / "polls.json").read_text())["jobs"]
    ids = {r["job_id"] for r in recs}
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30).stdout
    return {j: st for j, st in (line.split() for line in out.splitlines()) if j in ids}


def cancel_polls(run_dir: Path, timeout: float = 120) -> list[str]:
    """scancel every poll job (running or queued) until none is left for 3 s: a poll job submits its successor
    when it starts, so one cancelled at that moment may leave a new one."""
    end, cancelled, quiet = time.time() + timeout, [], 0
    while time.time() < end and quiet < 3:
        jobs = sorted(poll_jobs(run_dir))
        if jobs:
            subprocess.run(["scancel", *jobs], check=True)
            cancelled += jobs
            quiet = 0
        else:
            quiet += 1
        time.sleep(1)
    assert quiet >= 3, f"poll jobs keep coming back: {poll_jobs(run_dir)}"
    return cancelled


def test_autopilot_grows_two_stages_and_survives_cancel(
    slurm_cluster: SlurmCluster, tiny_corpus: Path, tmp_path: Path
) -> None:
    cfg = autopilot_setup(tmp_path, tiny_corpus / "eval", "slurm", poll_s=3)
    inbox, run_dir = tmp_path / "inbox", tmp_path / "runs" / "autopilot"
    start = jobs_cli(slurm_cluster, "autopilot", "--config", str(cfg))
    assert start.returncode == 0 and "poll job" in start.stdout, start.stderr[-2000:]
    again = jobs_cli(slurm_cluster, "autopilot", "--config", str(cfg))  # a second autopilot: refused politely
    assert again.returncode == 0 and "already scheduled" in again.stdout, again.stdout + again.stderr[-2000:]
    try:
        drop_crawl(inbox, "crawl_1", 60, seed=1)
        wait_for_event(run_dir, "stage_finished", 1)
        drop_crawl(inbox, "crawl_2", 40, seed=2)
        wait_for_event(run_dir, "stage_submitted", 2)
        # the recurring job is cancelled mid-stage (stage 2's jobs are queued or running) and started again
        assert cancel_polls(run_dir)  # the autopilot is gone; stage 2's jobs go on
        restart = jobs_cli(slurm_cluster, "autopilot", "--config", str(cfg))
        assert restart.returncode == 0 and "poll job" in restart.stdout, restart.stdout + restart.stderr[-2000:]
        wait_for_event(run_dir, "stage_finished", 2)
        status = jobs_cli(slurm_cluster, "status", str(run_dir))
        assert "stages made by the autopilot: 1, 2" in status.stdout, status.stdout
    finally:
        stop = jobs_cli(slurm_cluster, "autopilot", "--config", str(cfg), "--stop")
        assert stop.returncode == 0, stop.stderr[-2000:]
    for t in (1, 2):
        assert (run_dir / f"stage_{t:02d}" / "eval" / "metrics.json").exists()
    ev = events(run_dir)
    assert sorted(e["crawl"] for e in ev if e["event"] == "crawl_ingested") == ["crawl_1", "crawl_2"]
    assert [e["stage"] for e in ev if e["event"] == "stage_submitted"] == [1, 2]
    assert [e["stage"] for e in ev if e["event"] == "stage_ingested"] == [1, 2]
    assert not any(e["event"] in ("stage_failed", "paused") for e in ev)
    time.sleep(2)
    assert poll_jobs(run_dir) == {}  # stopped: no poll job left behind
