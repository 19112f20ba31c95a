"""The oracle on the real local SLURM (marker ``slurm``): one array task per candidate plus a summary job
``afterany`` the array; ``--wait`` prints the table; a second call submits nothing. Every wait is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]


def test_oracle_as_a_slurm_array(slurm_cluster: SlurmCluster, tiny_pipeline_config: Path, tmp_path: Path) -> None:
    env = {**os.environ, **slurm_cluster.env(), "GROWCLIP_LOG_LEVEL": "WARNING"}

    def jobs(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )

    run_dir = tmp_path / "run"
    made = jobs("submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2")
    assert made.returncode == 0, made.stderr[-3000:]  # the run itself: debug executor, in-process
    proc = jobs("oracle", "--run-dir", str(run_dir), "--stage", "2", "--executor", "slurm", "--wait")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    recs = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    tasks = [r for r in recs if r["step"] == "oracle"]
    summary_jobs = [r for r in recs if r["step"] == "oracle-summary"]
    assert len(tasks) == 3 and len({r["job_id"].split("_")[0] for r in tasks}) == 1  # one array
    assert len(summary_jobs) == 1
    scripts = [p.read_text() for p in (run_dir / "submitit").rglob("*_submission.sh")]
    assert any("--dependency=afterany:" in s for s in scripts)  # the summary waits for the whole array
    summary = json.loads((run_dir / "stage_02" / "oracle" / "summary.json").read_text())
    assert summary["missing"] == [] and len(summary["candidates"]) == 3
    assert "kendall tau (search vs full training)" in proc.stdout
    again = jobs("oracle", "--run-dir", str(run_dir), "--stage", "2", "--executor", "slurm")
    assert again.returncode == 0 and len(json.loads((run_dir / "jobs.json").read_text())["jobs"]) == len(recs)
