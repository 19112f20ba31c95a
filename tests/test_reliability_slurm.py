"""Reliability (issue #10, item 2): USR2 preemption of a search array task on the real local SLURM.

Stage 1 is trained in-process; stage 2's search is submitted as a 2-task array of ``SearchJob``
(exactly what ``submit --executor slurm`` submits), with ``search.steps`` raised so that the
candidate is still training when ``scancel --signal=USR2`` hits task 0. submitit's handler calls
``SearchJob``'s stop flag first: the candidate's training checkpoints at the next step boundary and
returns "preempted"; then submitit's handler calls ``SearchJob.checkpoint()`` (the same task again:
config path, stage, run dir, index), runs ``scontrol requeue`` on the array task and exits; the
requeued task skips the growth already on disk (``grown.pt``) and resumes the candidate's training in
``cand_00/work`` from the preemption checkpoint; both tasks finish with a score. The same through
``slurm/search_array.sbatch`` (the script forwards USR2, the candidate exits 3, the script requeues).
The training job's USR2 → checkpoint → requeue → resume path is ``tests/test_train_slurm.py``.
Every wait is bounded; a requeued task held on ``Reason=BeginTime`` is released with
``scontrol update StartTime=now`` (slurmctld holds requeued jobs briefly).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from data_tools.atomic import atomic_write_text
from jobs.cluster import make_executor
from jobs.config import RunCfg, dump_cfg, load_cfg
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
from jobs.engine.trainer import run_training
from jobs.stage_jobs import SearchJob
from tests.helpers import release_if_held, sbatch_script, squeue, wait_for

pytestmark = pytest.mark.slurm


def trained_stage1(tiny_pipeline_config: Path, tmp_path: Path) -> tuple[RunCfg, Path, Path]:
    """(config, its path in the run dir, run dir) with stage 1 trained in-process: what stage 2's search grows."""
    run_dir = tmp_path / "run"
    cfg = load_cfg(tiny_pipeline_config, ["search.steps=120", "train.log_every=3"])
    cfg_path = run_dir / "config.yaml"
    atomic_write_text(cfg_path, dump_cfg(cfg))
    assert run_training(cfg, 1, run_dir, DistEnv()).status == "completed"
    return cfg, cfg_path, run_dir


def test_usr2_requeues_a_search_array_task(slurm_cluster, tiny_pipeline_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, cfg_path, run_dir = trained_stage1(tiny_pipeline_config, tmp_path)
    executor = make_executor(cfg.cluster, run_dir / "submitit", "slurm", "search", run=cfg.name)
    jobs = executor.map_array(SearchJob(str(cfg_path), 2, str(run_dir)), [0, 1])
    victim = jobs[0]
    cand = run_dir / "stage_02" / "search" / "cand_00"
    work_events = cand / "work" / "stage_02" / "train" / "events.jsonl"

    def steps_done() -> int:
        if not work_events.exists():
            return 0
        return max((e["step"] for e in read_events(work_events) if e["event"] == "train"), default=0)

    try:
        wait_for("candidate 0 to train 15 steps", lambda: steps_done() >= 15 or victim.done(), timeout=180)
        assert not victim.done(), f"the task finished before it could be preempted: {victim.stderr()}"
        t_signal = time.time()
        subprocess.run(["scancel", "--signal=USR2", victim.job_id], check=True, timeout=30)
        interrupted_at = steps_done()

        def restarted() -> bool:
            release_if_held(victim.job_id, t_signal)
            return sum(e["event"] == "start" for e in read_events(cand / "events.jsonl")) >= 2

        wait_for("the requeued task to start again", restarted, timeout=180, poll=1.0)
        t_restart = time.time()
        wait_for("both tasks to finish", lambda: all(j.done() for j in jobs), timeout=300, poll=1.0)
    finally:
        live = [j.job_id for j in jobs if not j.done()]
        if live:
            subprocess.run(["scancel", *live], timeout=30, check=False)
    results = [j.result() for j in jobs]
    assert [r["status"] for r in results] == ["done", "done"], results
    assert [r["index"] for r in results] == [0, 1] and all(
        (cand.parent / f"cand_{k:02d}" / "result.json").exists() for k in (0, 1)
    )
    log = victim.stderr() or ""
    assert "Caught signal SIGUSR2" in log and "Requeued" in log, log[-3000:]
    assert results[0]["steps"] == 120
    events = read_events(cand / "events.jsonl")
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "scored"
    preempted_at = assert_resumed_where_preempted(events, read_events(work_events), interrupted_at)
    print(
        f"search requeue: USR2 at candidate step {interrupted_at}, checkpointed at {preempted_at}; restarted "
        f"{t_restart - t_signal:.1f} s later and resumed there; both tasks scored "
        f"({results[0]['score']:.4f}, {results[1]['score']:.4f})"
    )


def assert_resumed_where_preempted(cand_events: list[dict], work_events: list[dict], interrupted_at: int) -> int:
    """The candidate checkpointed at the signal and its requeued training resumed from that step."""
    preempted = [e for e in cand_events if e["event"] == "preempted"]
    assert len(preempted) == 1, cand_events
    step = preempted[0]["step"]
    assert interrupted_at <= step < 120
    assert [e["step"] for e in work_events if e["event"] == "resume"] == [step]
    trained = sorted(e["step"] for e in work_events if e["event"] == "train")
    assert trained == list(range(3, 121, 3)), "every logged step once: none redone twice, none lost"
    return step


def test_usr2_requeues_a_search_array_task_through_the_sbatch_script(  # type: ignore[no-untyped-def]
    slurm_cluster, tiny_pipeline_config: Path, tmp_path: Path
) -> None:
    _, cfg_path, run_dir = trained_stage1(tiny_pipeline_config, tmp_path)
    cand = run_dir / "stage_02" / "search" / "cand_00"
    work_events = cand / "work" / "stage_02" / "train" / "events.jsonl"
    options = ["--array=0", f"--output={tmp_path / 'slurm-%A_%a.out'}"]
    job = sbatch_script("search_array.sbatch", [str(cfg_path), "2", str(run_dir)], options) + "_0"

    def steps_done() -> int:
        events = read_events(work_events) if work_events.exists() else []
        return max((e["step"] for e in events if e["event"] == "train"), default=0)

    try:
        wait_for("candidate 0 to train 15 steps", lambda: steps_done() >= 15 or not squeue(job), timeout=180)
        assert squeue(job), "the task finished before it could be preempted"
        t_signal = time.time()
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True, timeout=30)  # what --signal=B: sends
        interrupted_at = steps_done()

        def finished() -> bool:
            return not release_if_held(job, t_signal) and (cand / "result.json").exists()

        wait_for("the requeued task to finish", finished, timeout=300, poll=1.0)
    finally:
        if squeue(job):
            subprocess.run(["scancel", job], timeout=30, check=False)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert '"status": "preempted"' in log, log[-3000:]
    events = read_events(cand / "events.jsonl")
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "scored"
    preempted_at = assert_resumed_where_preempted(events, read_events(work_events), interrupted_at)
    print(f"sbatch search requeue: USR2 at step {interrupted_at}, checkpointed at {preempted_at}, resumed there")
