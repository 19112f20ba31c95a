"""A search candidate stopped mid-training (SIGUSR2 in its array task) checkpoints, reports "preempted"
without failing, and the next call resumes it to the same score as an uninterrupted candidate."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from data_tools.atomic import atomic_write_text
from jobs.config import dump_cfg, load_cfg
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
from jobs.engine.report import load_run
from jobs.engine.runs import candidate_state
from jobs.engine.search import run_search_candidate
from jobs.engine.trainer import run_training
from tests.helpers import stop_at

OVERRIDES = ["search.steps=12", "train.log_every=2"]


@pytest.fixture(scope="module")
def stage1(tiny_pipeline_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("search_preempt") / "run"
    assert run_training(load_cfg(tiny_pipeline_config, OVERRIDES), 1, run_dir, DistEnv()).status == "completed"
    return run_dir


def test_preempted_candidate_resumes_to_the_uninterrupted_score(
    stage1: Path, tiny_pipeline_config: Path, tmp_path: Path
) -> None:
    cfg = load_cfg(tiny_pipeline_config, OVERRIDES)
    shutil.copytree(stage1, tmp_path / "a")
    shutil.copytree(stage1, tmp_path / "b")
    whole = run_search_candidate(cfg, 2, 1, tmp_path / "a", DistEnv())
    assert whole["status"] == "done" and whole["steps"] == 12

    stopped = run_search_candidate(cfg, 2, 1, tmp_path / "b", DistEnv(), should_stop=stop_at(5))
    assert stopped == {"status": "preempted", "stage": 2, "index": 1, "name": whole["name"], "step": 5}
    cand = tmp_path / "b" / "stage_02" / "search" / "cand_01"
    assert not (cand / "failed.json").exists() and not (cand / "result.json").exists()
    assert [e["event"] for e in read_events(cand / "events.jsonl")][-1] == "preempted"
    assert candidate_state(tmp_path / "b", 2, 1, None).startswith("preempted at step 5 (checkpointed")
    row = next(r for r in load_run(tmp_path / "b")["search"] if r["stage"] == 2 and r["index"] == 1)
    assert row["status"] == "preempted at step 5" and row["preemptions"] == 1

    resumed = run_search_candidate(cfg, 2, 1, tmp_path / "b", DistEnv())
    assert resumed["status"] == "done" and resumed["steps"] == 12
    work = read_events(cand / "work" / "stage_02" / "train" / "events.jsonl")
    assert [e["step"] for e in work if e["event"] == "resume"] == [5]
    assert not list((cand / "work" / "stage_02" / "train" / "checkpoints").glob("step_*"))  # final.pt is enough
    for key in ("val_loss", "proxy_acc1", "score", "samples"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    # the report counts the preemption and both attempts' time (result.json times the last one only)
    row = next(r for r in load_run(tmp_path / "b")["search"] if r["stage"] == 2 and r["index"] == 1)
    assert row["status"] == "done" and row["preemptions"] == 1
    assert row["seconds"] > json.loads((cand / "result.json").read_text())["seconds"]


def test_a_signal_after_the_last_step_defers_scoring_to_the_requeued_task(
    stage1: Path, tiny_pipeline_config: Path, tmp_path: Path
) -> None:
    cfg = load_cfg(tiny_pipeline_config, OVERRIDES)
    shutil.copytree(stage1, tmp_path / "b")
    # 12 boundary checks inside the 12-step training are False; the 13th, after it, is True
    late = run_search_candidate(cfg, 2, 1, tmp_path / "b", DistEnv(), should_stop=stop_at(12))
    assert late["status"] == "preempted" and late["step"] == 12
    cand = tmp_path / "b" / "stage_02" / "search" / "cand_01"
    assert (cand / "work" / "stage_02" / "train" / "final.pt").exists() and not (cand / "result.json").exists()
    done = run_search_candidate(cfg, 2, 1, tmp_path / "b", DistEnv())
    assert done["status"] == "done" and done["steps"] == 12


def test_search_job_outside_slurm_refuses_to_swallow_a_preemption(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.stage_jobs as sj

    monkeypatch.setattr(sj, "_search", lambda *a: {"status": "preempted", "step": 3})
    earlier = signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # no submitit handler (earlier tests may leave one)
    try:
        with pytest.raises(RuntimeError, match=r"candidate 0 was preempted \(SIGUSR2\) at step 3 outside a SLURM"):
            sj.SearchJob("cfg.yaml", 2, "run")(0)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL, "the job's USR2 handler must be put back"
    finally:
        signal.signal(signal.SIGUSR2, earlier if earlier is not None else signal.SIG_DFL)


def test_usr2_while_scoring_exits_3_and_the_requeued_task_scores(
    stage1: Path, tiny_pipeline_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `search-candidate` does: after training, SIGUSR2 exits 3 at once (final.pt is on disk)."""
    import jobs.engine.search as search
    from jobs.stage_jobs import _exit_preempted, _search
    from jobs.train import StopFlag

    cfg = load_cfg(tiny_pipeline_config, OVERRIDES)
    run_dir = tmp_path / "b"
    shutil.copytree(stage1, run_dir)
    cfg_path = run_dir / "config.yaml"
    atomic_write_text(cfg_path, dump_cfg(cfg))
    real_validate = search.validate_model

    def signal_then_validate(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning arrives while the candidate is scored
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(search, "validate_model", signal_then_validate)
    stop = StopFlag()
    earlier = signal.signal(signal.SIGUSR2, stop.set)
    try:
        with pytest.raises(SystemExit) as info:
            _search(str(cfg_path), 2, str(run_dir), 1, stop, _exit_preempted)
    finally:
        signal.signal(signal.SIGUSR2, earlier if earlier is not None else signal.SIG_DFL)
    assert info.value.code == 3 and not stop.is_set(), "the signal after training goes to the exit handler"
    cand = run_dir / "stage_02" / "search" / "cand_01"
    assert (cand / "work" / "stage_02" / "train" / "final.pt").exists()
    assert not (cand / "result.json").exists() and not (cand / "failed.json").exists()
    monkeypatch.undo()
    done = run_search_candidate(cfg, 2, 1, run_dir, DistEnv())  # the requeued task
    assert done["status"] == "done" and done["steps"] == 12


def test_preempted_round_resumes_to_the_uninterrupted_score(
    stage1: Path, tiny_pipeline_config: Path, tmp_path: Path
) -> None:
    """issue #17: a survivor preempted in round 2 resumes there and scores as if never stopped; round 1's score
    goes to its history."""
    from data_tools.atomic import atomic_write_json

    rounds = [*OVERRIDES, "search.trajectory=train", "search.rounds=2", "search.steps=3", "train.steps=12"]
    cfg = load_cfg(tiny_pipeline_config, rounds)
    results = {}
    for name, stop in (("a", None), ("b", stop_at(1))):  # calls counted from the resumed step 3
        shutil.copytree(stage1, tmp_path / name)
        run_dir = tmp_path / name
        first = run_search_candidate(cfg, 2, 1, run_dir, DistEnv(), round=1)
        assert first["round"] == 1 and first["steps"] == 3
        atomic_write_json(run_dir / "stage_02" / "search" / "round_01.json", {"stage": 2, "round": 1, "survivors": [1]})
        if stop is not None:
            out = run_search_candidate(cfg, 2, 0, run_dir, DistEnv(), round=2, should_stop=stop)
            assert out["status"] == "preempted" and out["step"] == 4
        results[name] = run_search_candidate(cfg, 2, 0, run_dir, DistEnv(), round=2)  # task 0 = survivor 1
    a, b = results["a"], results["b"]
    assert a["round"] == b["round"] == 2 and a["steps"] == b["steps"] == 6 and b["index"] == 1
    assert [h["steps"] for h in b["history"]] == [3]
    for key in ("val_loss", "proxy_acc1", "score", "samples"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
