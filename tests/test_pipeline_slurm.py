"""The stage pipeline on the real local SLURM (marker ``slurm``): a 2-stage tiny plan submitted at once
(search array + afterany/afterok chain), status, idempotent resubmission, and a killed array task
that a resubmission reruns alone. Every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


def jobs_cli(cluster: SlurmCluster, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**cluster.env(), "GROWCLIP_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def recorded(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "jobs.json").read_text())["jobs"]


def wait_idle(run_dir: Path, timeout: float = 240) -> None:
    """Until none of the run's recorded jobs is in squeue."""
    ids = {r["job_id"] for r in recorded(run_dir)}
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
        if not ids & set(out.split()):
            return
        time.sleep(1)
    subprocess.run(["scancel", *ids], check=False)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for jobs {sorted(ids)} of {run_dir}")


def test_two_stage_plan_on_slurm(slurm_cluster: SlurmCluster, tiny_pipeline_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    proc = jobs_cli(slurm_cluster, *args, "--executor", "slurm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = recorded(run_dir)
    steps = [(r["stage"], r["step"]) for r in recs]
    assert steps.count((2, "search")) == 3 and steps.count((1, "train")) == 1 and len(recs) == 8
    array_ids = {r["job_id"].split("_")[0] for r in recs if r["step"] == "search"}
    assert len(array_ids) == 1  # one array for the stage's candidates
    assert "stage 2 select: submitted" in proc.stdout and f"after afterany:{array_ids.pop()}" in proc.stdout
    scripts = [p.read_text() for p in (run_dir / "submitit").rglob("*_submission.sh")]
    assert any("#SBATCH --kill-on-invalid-dep=yes" in s and "--dependency=afterok:" in s for s in scripts)
    # a second submission while the jobs are queued/running submits nothing (the lock is free again)
    again = jobs_cli(slurm_cluster, *args, "--executor", "slurm")
    assert again.returncode == 0 and "0 jobs submitted" in again.stdout, again.stderr[-2000:]
    assert len(recorded(run_dir)) == 8
    wait_idle(run_dir)
    for t in (1, 2):
        assert (run_dir / f"stage_{t:02d}" / "eval" / "metrics.json").exists(), jobs_cli(
            slurm_cluster, "status", str(run_dir)
        ).stdout
    status = jobs_cli(slurm_cluster, "status", str(run_dir))
    assert status.returncode == 0
    assert "stage 2: search=done" in status.stdout and "winner " in status.stdout
    # finished work: a resubmission submits no job
    done = jobs_cli(slurm_cluster, *args, "--executor", "slurm", "--wait")
    assert done.returncode == 0 and "0 jobs submitted" in done.stdout, done.stderr[-2000:]
    assert len(recorded(run_dir)) == 8 and "stage 2: chosen=" in done.stdout
    # cancel touches only this run's jobs: nothing of it is queued now
    assert "nothing to cancel" in jobs_cli(slurm_cluster, "cancel", str(run_dir)).stdout


def test_killed_array_task_is_rerun_alone(
    slurm_cluster: SlurmCluster, tiny_pipeline_config: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # select needs all 3 candidates; one task at a time, so task 1 is still pending when it is cancelled
    args = ("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    args += ("--executor", "slurm", "--set", "search.min_successful=3", "--set", "cluster.array_parallelism=1")
    proc = jobs_cli(slurm_cluster, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    victim = next(r["job_id"] for r in recorded(run_dir) if r["step"] == "search" and r["index"] == 1)
    subprocess.run(["scancel", victim], check=True, timeout=30)
    wait_idle(run_dir)  # select fails (2 of 3); train/evaluate of stage 2 are removed (invalid dependency)
    s2 = run_dir / "stage_02"
    assert not (s2 / "selected.json").exists() and not (s2 / "search" / "cand_01" / "result.json").exists()
    mtimes = {k: (s2 / "search" / f"cand_{k:02d}" / "result.json").stat().st_mtime for k in (0, 2)}
    before = len(recorded(run_dir))
    proc = jobs_cli(slurm_cluster, *args, "--wait", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    new = recorded(run_dir)[before:]
    assert [(r["stage"], r["step"], r.get("index")) for r in new] == [
        (2, "search", 1),
        (2, "select", None),
        (2, "train", None),
        (2, "evaluate", None),
    ]
    assert (s2 / "search" / "cand_01" / "result.json").exists() and (s2 / "eval" / "metrics.json").exists()
    assert {k: (s2 / "search" / f"cand_{k:02d}" / "result.json").stat().st_mtime for k in (0, 2)} == mtimes
    assert os.path.exists(s2 / "selected.json")


def test_search_rounds_on_slurm(slurm_cluster: SlurmCluster, tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """issue #17: each search round is its own array, chained to the previous round through its ranking job
    (afterok); everything is submitted at once; the winner's training continues its search state."""
    from tests.test_search_rounds import ROUNDS, sets

    run_dir = tmp_path / "run"
    args = ("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    proc = jobs_cli(slurm_cluster, *args, "--executor", "slurm", *sets(ROUNDS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = recorded(run_dir)
    arrays = {rr: {r["job_id"].split("_")[0] for r in recs if r["step"] == "search" and r.get("round", 1) == rr}
              for rr in (1, 2)}  # fmt: skip
    assert all(len(ids) == 1 for ids in arrays.values()) and arrays[1] != arrays[2]  # one array per round
    rank1 = next(r["job_id"] for r in recs if r["step"] == "select" and r.get("round", 1) == 1)
    assert "stage 2 search round 2: submitted" in proc.stdout and f"after afterok:{rank1}" in proc.stdout
    wait_idle(run_dir)
    sel = json.loads((run_dir / "stage_02" / "selected.json").read_text())
    assert sel["rounds"] == 2 and sel["continues"] and (run_dir / "stage_02" / "eval" / "metrics.json").exists()
    status = jobs_cli(slurm_cluster, "status", str(run_dir))
    assert "search2=done" in status.stdout and "select2=done" in status.stdout, status.stdout
    done = jobs_cli(slurm_cluster, *args, "--executor", "slurm", *sets(ROUNDS))
    assert done.returncode == 0 and "0 jobs submitted" in done.stdout, done.stderr[-2000:]
