"""submitit wiring of the training job (R13, R17): a 2-step smoke run with the in-process debug executor,
and the requeue path without SLURM: ``checkpoint()`` resubmits the same job, which resumes from disk.
"""

from __future__ import annotations

import re
from pathlib import Path

import submitit

from jobs.config import load_cfg
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
from jobs.engine.trainer import run_training
from jobs.submit_train import TrainJob, make_executor


def test_debug_executor_two_step_smoke(tiny_config: Path, tmp_path: Path) -> None:
    overrides = ("train.steps=2", "train.warmup_steps=1")
    cfg = load_cfg(tiny_config, overrides)
    job = make_executor(cfg.cluster, tmp_path / "submitit", "debug").submit(
        TrainJob(str(tiny_config), overrides, 1, str(tmp_path / "run"))
    )
    result = job.result()
    assert result["status"] == "completed" and result["step"] == 2
    assert (tmp_path / "run" / "stage_01" / "eval" / "metrics.json").is_file()


def test_checkpoint_resubmits_a_job_that_resumes(tiny_config: Path, tmp_path: Path) -> None:
    overrides = ("train.steps=12", "train.checkpoint_every=4")
    job = TrainJob(str(tiny_config), overrides, 1, str(tmp_path / "run"))
    calls = {"n": -1}

    def stop_at_6() -> bool:
        calls["n"] += 1
        return calls["n"] == 6

    first = run_training(load_cfg(tiny_config, overrides), 1, tmp_path / "run", DistEnv(), should_stop=stop_at_6)
    assert first.status == "preempted" and first.step == 6
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function, TrainJob)
    assert vars(delayed.function) == vars(job)  # only paths and overrides travel; state comes from disk
    result = make_executor(load_cfg(tiny_config).cluster, tmp_path / "submitit", "debug").submit(delayed.function)
    assert result.result() == {"status": "completed", "step": 12, "final": str(first.train_dir / "final.pt")}
    events = read_events(first.train_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [6]


def test_engine_never_imports_submitit() -> None:
    """R1/R13: the loops live in jobs/engine/, which runs without submitit; only the thin jobs use it."""
    engine = Path(__file__).resolve().parents[1] / "jobs" / "engine"
    offenders = [
        f"{p.name}:{i}"
        for p in sorted(engine.glob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"^\s*(import|from)\s+submitit\b", line)
    ]
    assert not offenders, offenders
