"""The stage pipeline without SLURM: a 2-stage tiny plan in-process (debug executor), plan dry run,
idempotent resubmission, selection tolerance, lock refusal and stale-lock break, early vocab check."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.engine.score import SearchScore

REPO = Path(__file__).resolve().parents[1]


def jobs_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GROWCLIP_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def debug_run(tiny_pipeline_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = jobs_cli("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_two_stage_plan_end_to_end(debug_run: tuple[Path, str]) -> None:
    run_dir, out = debug_run
    s1, s2 = run_dir / "stage_01", run_dir / "stage_02"
    assert (s1 / "train" / "final.pt").exists() and (s1 / "eval" / "metrics.json").exists()
    assert not (s1 / "search").exists()  # stage 1 trains the config's model: no search
    cands = json.loads((s2 / "search" / "candidates.json").read_text())
    names = [c["name"] for c in cands["candidates"]]
    assert names[0] == "none" and set(names) == {"none", "image_depth", "text_depth"}
    assert cands["data_ratio"] == pytest.approx(2.0)
    for k in range(len(names)):
        res = json.loads((s2 / "search" / f"cand_{k:02d}" / "result.json").read_text())
        assert res["status"] == "done" and res["steps"] == 4
        expected = res["val_loss"] - res["proxy_acc1"] + 0.05 * math.log(res["cost_ratio"])
        assert res["score"] == pytest.approx(expected)
        assert res["growth"]["params_after"] == res["params"]
        assert max(res["growth"]["error"].values()) < 1e-4  # PIM momentum 1: function preserved
        assert (s2 / "search" / f"cand_{k:02d}" / "events.jsonl").exists()
    sel = json.loads((s2 / "selected.json").read_text())
    best = min((r for r in sel["table"] if r["status"] == "done"), key=lambda r: r["score"])
    assert sel["winner"]["name"] == best["name"] and sel["reason"]
    assert sel["score_formula"] == SearchScore.FORMULA
    for row in sel["table"]:  # the table keeps every term, and the terms add up to the score
        assert row["score"] == pytest.approx(sum(row[f"term_{t}"] for t in SearchScore.TERMS))
    assert (s2 / "selected.pt").exists() and (s2 / "train" / "final.pt").exists()
    spec = json.loads((s2 / "train" / "spec.json").read_text())
    assert spec == sel["winner"]["spec"]  # stage 2 trained the winner's architecture
    assert (s2 / "eval" / "metrics.json").exists()
    assert "stage 2 select:" in out and "mean_acc1" in out and "i2t_R@1" in out
    assert not (run_dir / "lock").exists()
    report = jobs_cli("report", str(run_dir))
    assert report.returncode == 0 and "stage 2: chosen=" in report.stdout


def test_resubmit_skips_finished_work(debug_run: tuple[Path, str], tiny_pipeline_config: Path) -> None:
    run_dir, _ = debug_run
    before = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    mtime = (run_dir / "stage_02" / "train" / "final.pt").stat().st_mtime
    proc = jobs_cli("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done (skipped)") == 6  # s1 train/eval + s2 search/select/train/eval
    assert json.loads((run_dir / "jobs.json").read_text())["jobs"] == before
    assert (run_dir / "stage_02" / "train" / "final.pt").stat().st_mtime == mtime


def test_plan_dry_run(debug_run: tuple[Path, str], tiny_pipeline_config: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    proc = jobs_cli("plan", "--config", str(tiny_pipeline_config), "--run-dir", str(fresh), "--executor", "slurm")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "stage 1 train    submit job" in out and "stage 3 evaluate submit job" in out
    assert "sbatch --array=0,1,2%2 --dependency=afterok:<stage1.train> slurm/search_array.sbatch" in out
    assert "dependency afterany:<stage2.search>" in out and "decided after stage 1 trains" in out
    assert not fresh.exists()  # a dry run writes nothing
    run_dir, _ = debug_run  # stage 1-2 done: only stage 3 left, its candidates known
    proc = jobs_cli("plan", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "stage 2 train    done (skipped)" in proc.stdout
    assert "stage 3 search   submit array [0, 1, 2]" in proc.stdout and "stage 3 candidates: 0:none" in proc.stdout


def test_plan_waits_for_a_queued_stage_outside_stages(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """--stages 2 while stage 1's training is still queued: stage 2's search waits for that job."""
    from jobs.config import ConfigError, load_cfg
    from jobs.engine.pipeline import plan_actions
    from jobs.engine.records import JobRecord

    cfg = load_cfg(tiny_pipeline_config)
    queued = {(1, "train"): [JobRecord(stage=1, step="train", job_id="41")]}
    actions = {(a.stage, a.step): a for a in plan_actions(cfg, tmp_path / "run", [2], queued)}
    assert list(actions) == [(1, "train"), (2, "search"), (2, "select"), (2, "train"), (2, "evaluate")]
    assert actions[(1, "train")].status == "running" and actions[(1, "train")].running == ["41"]
    assert actions[(2, "search")].after == [("afterok", 1, "train", 1)] and actions[(2, "search")].indices == [0, 1, 2]
    assert actions[(2, "select")].after == [("afterany", 2, "search", 1)]
    with pytest.raises(ConfigError, match="include stage 1 in --stages"):
        plan_actions(cfg, tmp_path / "run", [2], {})


def test_cluster_protocol_without_a_queue(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """jobs.cluster: one factory for every job kind; local/debug jobs are never active; SLURM's word on states."""
    from jobs.cluster import CLUSTERS, get_cluster, job_states, load_jobs, make_executor, record_jobs, resources
    from jobs.config import ConfigError, load_cfg

    cc = load_cfg(tiny_pipeline_config).cluster
    assert resources(cc, "oracle") == resources(cc, "train") and resources(cc, "oracle-summary")["cpus_per_task"] == 1
    ex = make_executor(cc, tmp_path / "submitit", "debug", "oracle", run="demo")
    assert ex.cluster == "debug" and ex.parameters["name"] == "growclip-demo-oracle"
    assert make_executor(cc, tmp_path / "submitit", "debug").parameters["name"] == "growclip-train"
    record_jobs(tmp_path, [{"stage": 1, "step": "train", "job_id": "7", "executor": "debug", "time": 0}])
    record_jobs(tmp_path, [{"stage": 1, "step": "evaluate", "job_id": "8", "executor": "local", "time": 0}])
    recs = load_jobs(tmp_path)
    assert [r.job_id for r in recs] == ["7", "8"] and job_states(recs) == ["debug", "local"]
    with pytest.raises(ConfigError, match="job_id"):  # the ledger only gains complete records
        record_jobs(tmp_path, [{"stage": 1, "step": "train", "executor": "local"}])
    assert len(load_jobs(tmp_path)) == 2
    assert get_cluster("debug").active(tmp_path) == {} and not get_cluster("local").queues
    slurm = CLUSTERS["slurm"]
    assert slurm.queues and slurm.dependency("afterany", ["12_0", "12_1", "9"]) == ["afterany:12", "afterany:9"]
    assert slurm.is_active("PENDING") and not slurm.is_active("PENDING", "DependencyNeverSatisfied")
    assert slurm.is_failed("CANCELLED by 0") and slurm.is_running("COMPLETING") and not slurm.is_failed("COMPLETED")
    with pytest.raises(ValueError, match="unknown executor 'pbs'"):
        get_cluster("pbs")


def test_select_tolerates_failed_candidates(debug_run: tuple[Path, str], tmp_path: Path) -> None:
    from jobs.config import load_cfg
    from jobs.engine.select import SelectionError, run_select

    src, _ = debug_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    cfg = load_cfg(run_dir / "config.yaml")
    s2 = run_dir / "stage_02"
    (s2 / "selected.json").unlink()
    win = json.loads((src / "stage_02" / "selected.json").read_text())["winner"]["index"]
    (s2 / "search" / f"cand_{win:02d}" / "result.json").unlink()  # the winner "was killed"
    with pytest.raises(SelectionError, match="only 2 of 3 candidates finished"):
        run_select(replace(cfg, search=replace(cfg.search, min_successful=3)), 2, run_dir)
    sel = run_select(cfg, 2, run_dir)
    assert sel["winner"]["index"] != win and sel["failed"] == [win]
    row = next(r for r in sel["table"] if r["index"] == win)
    assert row["status"] == "failed" and "no result" in row["error"]


def test_lock_refuses_second_submitter_and_breaks_stale(
    debug_run: tuple[Path, str], tiny_pipeline_config: Path
) -> None:
    import socket
    import time

    run_dir, _ = debug_run
    lock = run_dir / "lock"
    args = ("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    live = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    lock.write_text(json.dumps(live))
    try:
        proc = jobs_cli(*args)
        assert proc.returncode == 2 and "another submitter" in proc.stderr
        proc = jobs_cli(*args, "--break-lock")  # a live holder's lock is never broken
        assert proc.returncode == 2 and "another submitter" in proc.stderr
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock.write_text(json.dumps({**live, "pid": int(dead.stdout)}))
        proc = jobs_cli(*args)
        assert proc.returncode == 2 and "stale" in proc.stderr and "--break-lock" in proc.stderr
        status = jobs_cli("status", str(run_dir))
        assert "(stale)" in status.stdout
        proc = jobs_cli(*args, "--break-lock")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_vocab_mismatch_fails_early(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    proc = jobs_cli(
        "plan",
        "--config",
        str(tiny_pipeline_config),
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "model.text.vocab_size=64",
    )
    assert proc.returncode == 2
    assert "model.text.vocab_size=64" in proc.stderr and "--vocab-size 64" in proc.stderr


def test_stages_need_their_predecessor(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    proc = jobs_cli("plan", "--config", str(tiny_pipeline_config), "--run-dir", str(tmp_path / "r"), "--stages", "3")
    assert proc.returncode == 2 and "include stage 2 in --stages" in proc.stderr
