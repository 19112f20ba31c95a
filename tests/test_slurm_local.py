"""End-to-end checks against the real local SLURM of slurm/local/up.

sbatch (plain, array, dependency), submitit (submit + map_array) and sacct accounting. Every wait is
bounded; jobs run as root on this machine, so they write straight into tmp_path.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

MEM = "100M"
TIME_MIN = "2"
JOB_TIMEOUT_S = 60.0  # each job here takes 1-5 s once it starts
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

# Job ids (as sacct prints them, array parents without a task suffix) -> how many allocation
# records sacct must show COMPLETED. Filled by the tests above test_sacct_records_all_jobs_completed.
_COMPLETED_JOBS: dict[str, int] = {}


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def sbatch(cwd: Path, *args: str) -> str:
    out = run(["sbatch", "--parsable", f"--mem={MEM}", f"--time={TIME_MIN}", *args], cwd=cwd)
    job_id = out.strip().split(";")[0]
    assert re.fullmatch(r"\d+", job_id), out
    return job_id


def job_states(job_id: str) -> list[str]:
    """JobState of the job (one entry per array task) while slurmctld still knows it (MinJobAge)."""
    out = run(["scontrol", "show", "job", "-o", job_id])
    return re.findall(r"\bJobState=(\S+)", out)


def wait_finished(job_id: str, timeout: float = JOB_TIMEOUT_S) -> list[str]:
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = job_states(job_id)
        if states and all(s in TERMINAL_STATES for s in states):
            return states
        time.sleep(0.25)
    detail = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s (states {states}):\n{detail.stdout}{detail.stderr}")


def squeue_state_reason(job_id: str) -> str:
    return run(["squeue", "-h", "-j", job_id, "-o", "%T:%r"]).strip()


def wait_submitit(job, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"submitit job {job.job_id} not done after {timeout:.0f}s (state {job.state}):\n{job.stderr()}")
        time.sleep(0.5)
    return job.result()


def test_plain_sbatch(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "plain.out"
    job_id = sbatch(tmp_path, "--job-name=gc-plain", f"--output={out}", "--wrap", 'echo "hello from job $SLURM_JOB_ID"')
    assert wait_finished(job_id) == ["COMPLETED"]
    assert out.read_text().strip() == f"hello from job {job_id}"
    _COMPLETED_JOBS[job_id] = 1


def test_array_job(slurm_cluster, tmp_path: Path) -> None:
    job_id = sbatch(
        tmp_path,
        "--job-name=gc-array",
        "--array=0-3",
        f"--output={tmp_path}/array-%A_%a.out",
        "--wrap",
        'echo "task=$SLURM_ARRAY_TASK_ID parent=$SLURM_ARRAY_JOB_ID"',
    )
    assert wait_finished(job_id) == ["COMPLETED"] * 4
    outputs = sorted(tmp_path.glob("array-*.out"))
    assert [p.name for p in outputs] == [f"array-{job_id}_{i}.out" for i in range(4)]
    seen = [p.read_text().strip() for p in outputs]
    assert seen == [f"task={i} parent={job_id}" for i in range(4)]
    _COMPLETED_JOBS[job_id] = 4


def test_dependency_afterok_waits_for_first_job(slurm_cluster, tmp_path: Path) -> None:
    first_done = tmp_path / "first.done"
    first = sbatch(tmp_path, "--job-name=gc-first", "-o", "/dev/null", "--wrap", f"sleep 3; date +%s.%N > {first_done}")
    second_out = tmp_path / "second.out"
    second = sbatch(
        tmp_path,
        "--job-name=gc-second",
        f"--dependency=afterok:{first}",
        f"--output={second_out}",
        "--wrap",
        f"date +%s.%N; if [ -f {first_done} ]; then echo first-was-done; else echo first-NOT-done; fi",
    )
    # The first job sleeps 3 s, so right now the second one must be held back by its dependency.
    assert squeue_state_reason(second) == "PENDING:Dependency"
    assert wait_finished(first) == ["COMPLETED"]
    assert wait_finished(second) == ["COMPLETED"]
    second_started, verdict = second_out.read_text().split()
    assert verdict == "first-was-done"
    assert float(second_started) >= float(first_done.read_text())
    _COMPLETED_JOBS[first] = 1
    _COMPLETED_JOBS[second] = 1


def test_dependency_afterok_never_runs_after_failure(slurm_cluster, tmp_path: Path) -> None:
    failing = sbatch(tmp_path, "--job-name=gc-fail", "-o", "/dev/null", "--wrap", "exit 3")
    marker = tmp_path / "must-not-exist"
    blocked = sbatch(
        tmp_path,
        "--job-name=gc-blocked",
        f"--dependency=afterok:{failing}",
        "-o",
        "/dev/null",
        "--wrap",
        f"touch {marker}",
    )
    assert wait_finished(failing) == ["FAILED"]
    deadline = time.monotonic() + 30
    try:
        while (state := squeue_state_reason(blocked)) != "PENDING:DependencyNeverSatisfied":
            assert state.startswith("PENDING"), f"job {blocked} left PENDING: {state}"
            assert time.monotonic() < deadline, f"job {blocked} still {state} 30 s after its dependency failed"
            time.sleep(0.25)
    finally:
        run(["scancel", blocked])
    assert not marker.exists()


def test_submitit_submit_and_map_array(slurm_cluster, tmp_path: Path) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j", cluster="slurm")
    assert executor.cluster == "slurm"
    executor.update_parameters(name="gc-submitit", timeout_min=5, cpus_per_task=1, slurm_mem="500M")

    # Defined here (not at module level) so that cloudpickle ships the code by value: the job's
    # python cannot import this test module.
    def affine(x: int, scale: int = 1) -> dict:
        import os

        return {"value": scale * x + 1, "job_id": os.environ["SLURM_JOB_ID"]}

    def square(x: int) -> int:
        return x * x

    job = executor.submit(affine, 20, scale=2)
    result = wait_submitit(job)
    assert result["value"] == 41
    assert result["job_id"] == job.job_id

    inputs = [1, 2, 3, 4]
    jobs = executor.map_array(square, inputs)
    assert len(jobs) == len(inputs)
    assert [wait_submitit(j) for j in jobs] == [x * x for x in inputs]
    array_ids = {j.job_id.split("_")[0] for j in jobs}
    assert len(array_ids) == 1, f"map_array should make one array job, got {array_ids}"

    _COMPLETED_JOBS[job.job_id] = 1
    _COMPLETED_JOBS[array_ids.pop()] = len(inputs)


def test_sacct_records_all_jobs_completed(slurm_cluster, tmp_path: Path) -> None:
    expected = dict(_COMPLETED_JOBS)
    if not expected:  # run on its own: make one job to look for
        job_id = sbatch(tmp_path, "--job-name=gc-sacct", "-o", "/dev/null", "--wrap", "true")
        assert wait_finished(job_id) == ["COMPLETED"]
        expected[job_id] = 1
    ids = ",".join(expected)
    # Records reach slurmdbd a few seconds after the jobs end: poll.
    deadline = time.monotonic() + 45
    while True:
        out = run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ids])
        records: dict[str, list[str]] = {}
        for line in out.splitlines():
            if not line.strip():
                continue
            sacct_id, state = line.split("|")[:2]
            records.setdefault(sacct_id.split("_")[0], []).append(state)
        complete = all(records.get(job_id, []) == ["COMPLETED"] * count for job_id, count in expected.items())
        if complete:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"sacct does not show all jobs COMPLETED after 45 s; expected {expected}, got:\n{out}")
        time.sleep(1)
