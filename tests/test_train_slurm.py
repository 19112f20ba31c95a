"""SLURM requeue (issue #5) on the real local cluster: USR2 mid-run -> checkpoint -> requeue -> resume -> done.

Every wait is bounded. A requeued job may wait on ``Reason=BeginTime`` (slurmctld holds requeued
jobs briefly); the test releases it with ``scontrol update StartTime=now`` if it lingers (see
shared ENVIRONMENT.md), so the whole test takes ~30-60 s.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from jobs.config import load_cfg
from jobs.engine.checkpoint import load_checkpoint
from jobs.engine.metrics import read_events
from jobs.submit_train import TrainJob, make_executor
from tests.helpers import release_if_held, sbatch_script, squeue, wait_for

pytestmark = pytest.mark.slurm

STEPS = 400
OVERRIDES = ("train.steps=400", "train.checkpoint_every=100", "train.log_every=10", "train.warmup_steps=20")


def test_usr2_requeues_and_finishes(slurm_cluster, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_cfg(tiny_config, OVERRIDES)
    run_dir = tmp_path / "run"
    td = run_dir / "stage_01" / "train"
    job = make_executor(cfg.cluster, run_dir / "submitit").submit(
        TrainJob(str(tiny_config), OVERRIDES, 1, str(run_dir))
    )
    events = lambda: read_events(td / "events.jsonl")  # noqa: E731

    def steps_done() -> int:
        return max([e["step"] for e in events() if e["event"] == "train"], default=0)

    wait_for("the job to pass step 50", lambda: steps_done() >= 50 or job.done(), timeout=120)
    assert not job.done(), f"job finished before it could be preempted: {job.stderr()}"
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    preempted = wait_for(
        "the preemption checkpoint", lambda: [e for e in events() if e["event"] == "preempted"], timeout=60
    )[0]
    assert 50 <= preempted["step"] < STEPS

    def restarted() -> bool:
        release_if_held(job.job_id, t_signal, after=20)
        return any(e["event"] == "resume" for e in events())

    wait_for("the requeued job to resume", restarted, timeout=150, poll=1.0)
    t_resume = time.time()
    wait_for("the job to finish", job.done, timeout=180, poll=1.0)
    result = job.result()
    assert result["status"] == "completed" and result["step"] == STEPS, result
    resume = next(e for e in events() if e["event"] == "resume")
    assert resume["step"] == preempted["step"]
    assert load_checkpoint(td / "final.pt")["step"] == STEPS
    steps = sorted(e["step"] for e in events() if e["event"] == "train")
    assert steps == list(range(10, STEPS + 1, 10))  # every step logged once: redone steps replaced
    assert (run_dir / "stage_01" / "eval" / "metrics.json").is_file()
    print(f"requeue: signal -> resumed {t_resume - t_signal:.1f}s; preempted at step {preempted['step']}")


def test_srun_two_tasks_read_rank_from_slurm(slurm_cluster, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`srun -n 2 python -m jobs train`: rank/world size/master from SLURM_* (jobs/engine/dist.py), gloo DDP."""
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["srun", "-n", "2", "--cpus-per-task=1", "--mem=4G", sys.executable, "-m", "jobs", "train",
         "--config", str(tiny_config), "--stage", "1", "--run-dir", str(run_dir), "--no-eval",
         "--set", "train.steps=6", "--set", "train.data_streams=2"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend=gloo rank=0/2" in proc.stderr
    final = load_checkpoint(run_dir / "stage_01" / "train" / "final.pt")
    assert final["world_size"] == 2 and final["step"] == 6


def test_usr2_requeues_the_train_sbatch_script(slurm_cluster, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`sbatch slurm/train.sbatch`: the batch shell gets USR2 (what --signal=B:USR2 sends), forwards it to the
    srun'd trainer, which checkpoints and exits 3; the script requeues the job; the restart resumes and finishes."""
    from data_tools.atomic import atomic_write_text
    from jobs.config import dump_cfg

    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "config.yaml"
    atomic_write_text(cfg_path, dump_cfg(load_cfg(tiny_config, OVERRIDES)))
    td = run_dir / "stage_01" / "train"
    options = ["--ntasks-per-node=1", f"--output={tmp_path}/slurm-%j.out"]
    job = sbatch_script("train.sbatch", [str(cfg_path), "1", str(run_dir)], options)
    events = lambda: read_events(td / "events.jsonl")  # noqa: E731

    def steps_done() -> int:
        return max([e["step"] for e in events() if e["event"] == "train"], default=0)

    try:
        wait_for("the job to pass step 50", lambda: steps_done() >= 50 or not squeue(job), timeout=120)
        assert squeue(job), "the job finished before it could be preempted"
        t_signal = time.time()
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)
        preempted = wait_for(
            "the preemption checkpoint", lambda: [e for e in events() if e["event"] == "preempted"], timeout=60
        )[0]

        def finished() -> bool:
            return not release_if_held(job, t_signal) and (td / "final.pt").exists()

        wait_for("the requeued job to finish", finished, timeout=240, poll=1.0)
    finally:
        if squeue(job):
            subprocess.run(["scancel", job], timeout=30, check=False)
    assert [e["step"] for e in events() if e["event"] == "resume"] == [preempted["step"]]
    assert load_checkpoint(td / "final.pt")["step"] == STEPS
    assert sorted(e["step"] for e in events() if e["event"] == "train") == list(range(10, STEPS + 1, 10))
    print(f"train.sbatch requeue: USR2 -> checkpoint at step {preempted['step']} -> resumed there -> finished")
