"""The search oracle (issue #15 item 1): every candidate of a stage trained fully, Kendall tau and regret.

A 2-stage tiny plan (debug executor), then ``python -m jobs oracle --stage 2``: each finished candidate is
trained exactly as the winner's full training (the winner's own training is reused, not redone),
evaluated, and summarised; the run's own results are untouched; a re-run is a no-op; bad calls are one
error line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.loaders import make_val_loader
from jobs.config import load_cfg
from jobs.engine.oracle import kendall_tau

REPO = Path(__file__).resolve().parents[1]


def jobs_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GROWCLIP_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kendall_tau() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair of 6: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in the second ranking: (4 - 1) / sqrt(6 * 5)
    assert kendall_tau([1, 2, 3, 4], [1, 1, 3, 2]) == pytest.approx(3 / (6 * 5) ** 0.5)
    assert kendall_tau([1, 1], [2, 3]) is None
    with pytest.raises(ValueError, match="one score per item"):
        kendall_tau([1, 2], [1])


@pytest.fixture(scope="module")
def graded_run(tiny_pipeline_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("oracle") / "run"
    proc = jobs_cli("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_oracle_trains_every_candidate_as_the_winner(graded_run: Path) -> None:
    s2 = graded_run / "stage_02"
    before = {p: _sha(p) for p in (s2 / "selected.json", s2 / "train" / "final.pt", s2 / "eval" / "metrics.json")}
    proc = jobs_cli("oracle", "--run-dir", str(graded_run), "--stage", "2", "--executor", "debug")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kendall tau (search vs full training)" in proc.stdout and "regret" in proc.stdout
    summary = json.loads((s2 / "oracle" / "summary.json").read_text())
    selected = json.loads((s2 / "selected.json").read_text())
    names = {r["name"] for r in selected["table"] if r["status"] == "done"}
    cfg = load_cfg(graded_run / "config.yaml")
    heldout = sum(
        len(images)
        for images, _ in make_val_loader(
            cfg.data.root, 2, batch_size=16, image_size=16, context_length=16, val_fraction=cfg.data.val_fraction
        )
    )
    assert {r["name"] for r in summary["candidates"]} == names and summary["missing"] == []
    assert summary["chosen"] == selected["winner"]["name"]
    for row in summary["candidates"]:
        res = json.loads((s2 / "oracle" / f"cand_{row['index']:02d}" / "result.json").read_text())
        assert res["steps"] == 6  # train.steps of the tiny plan: the full training, not the search's 4
        assert row["search_rank"] is not None and row["val_loss"] > 0 and 0 <= row["mean_acc1"] <= 1
        assert row["val_loss_se"] >= 0 and res["val_samples"] == heldout  # the whole split, not search.val_samples
        assert res["reused_stage_training"] == row["chosen"]
        if row["chosen"]:
            assert res["final"] == str(s2 / "train" / "final.pt")  # the stage's own training, not redone
    chosen = next(r for r in summary["candidates"] if r["chosen"])
    assert summary["regret_mean_acc1"] == pytest.approx(
        max(r["mean_acc1"] for r in summary["candidates"]) - chosen["mean_acc1"]
    )
    assert set(summary["kendall_tau"]) == {"val_loss", "mean_acc1"}
    assert {p: _sha(p) for p in before} == before  # the run's own results never change

    again = jobs_cli("oracle", "--run-dir", str(graded_run), "--stage", "2", "--executor", "debug")
    assert again.returncode == 0 and json.loads((s2 / "oracle" / "summary.json").read_text()) == summary


def test_oracle_bad_calls_are_one_line(graded_run: Path) -> None:
    for args, needle in (
        (["--stage", "3"], "stage 3 has no selected.json"),
        (["--stage", "1"], "--stage 1 must be in 2..data.stages=3"),
        (["--stage", "2", "--set", "train.steps=1"], "another config: train.steps: 6 -> 1"),
    ):
        proc = jobs_cli("oracle", "--run-dir", str(graded_run), *args, "--executor", "debug")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and needle in lines[-1] and lines[-1].startswith("error: "), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_report_shows_the_oracle(graded_run: Path, tmp_path: Path) -> None:
    from jobs.engine.report import format_report, write_report

    if not (graded_run / "stage_02" / "oracle" / "summary.json").exists():
        proc = jobs_cli("oracle", "--run-dir", str(graded_run), "--stage", "2", "--executor", "debug")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kendall tau (search vs full training)" in format_report(graded_run)
    write_report([graded_run], tmp_path / "md", "md")
    text = (tmp_path / "md" / "report.md").read_text()
    assert "Search fidelity (oracle)" in text and "Kendall tau of the search ranking" in text
    write_report([graded_run], tmp_path / "csv", "csv")
    rows = (tmp_path / "csv" / "oracle.csv").read_text().splitlines()
    assert rows[0].startswith("run,stage,") and "tau_val_loss" in rows[0] and len(rows) == 4  # 3 candidates


def test_status_and_plan_know_the_oracle(graded_run: Path, tiny_pipeline_config: Path) -> None:
    from jobs.engine.oracle import oracle_status

    assert oracle_status(graded_run, 3) is None  # stage 3 not selected: nothing to grade yet
    if not (graded_run / "stage_02" / "oracle" / "summary.json").exists():
        assert jobs_cli("oracle", "--run-dir", str(graded_run), "--stage", "2", "--executor", "debug").returncode == 0
    status = jobs_cli("status", str(graded_run))
    assert status.returncode == 0 and "oracle: 3/3 candidates trained fully; kendall tau val_loss" in status.stdout
    plan = jobs_cli("plan", "--config", str(graded_run / "config.yaml"), "--run-dir", str(graded_run))
    assert plan.returncode == 0 and "stage 2 oracle: 3/3 candidates trained fully" in plan.stdout, plan.stderr


def test_a_preempted_oracle_candidate_resumes_to_the_same_result(graded_run: Path, tmp_path: Path) -> None:
    """Preemption (should_stop) checkpoints the candidate's training; the next call resumes it, no step redone."""
    import shutil

    from jobs.config import load_cfg
    from jobs.engine.dist import DistEnv
    from jobs.engine.metrics import read_events
    from jobs.engine.oracle import oracle_plan, run_oracle_candidate
    from jobs.engine.rundir import RunDir
    from tests.helpers import stop_at

    cfg = load_cfg(graded_run / "config.yaml")
    plan = oracle_plan(graded_run, 2)
    selected = json.loads((graded_run / "stage_02" / "selected.json").read_text())
    k = next(i for i, c in enumerate(plan) if c["index"] != selected["winner"]["index"])
    cdir = RunDir(graded_run).stage(2).oracle.cand(plan[k]["index"]).path
    reference = json.loads((cdir / "result.json").read_text()) if (cdir / "result.json").exists() else None
    shutil.rmtree(cdir, ignore_errors=True)
    first = run_oracle_candidate(cfg, 2, k, graded_run, DistEnv(), should_stop=stop_at(3))
    assert first["status"] == "preempted" and first["step"] == 3 and not (cdir / "result.json").exists()
    second = run_oracle_candidate(cfg, 2, k, graded_run, DistEnv())
    assert second["status"] == "done" and second["steps"] == 6
    steps = [
        e["step"] for e in read_events(cdir / "work" / "stage_02" / "train" / "events.jsonl") if e["event"] == "train"
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # every step once
    if reference is not None:  # an uninterrupted run of the same candidate gives the same held-out loss
        assert second["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)
    assert run_oracle_candidate(cfg, 2, k, graded_run, DistEnv()) == second  # idempotent
