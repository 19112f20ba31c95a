"""A search candidate stopped mid-training (SIGUSR2 in its array task) checkpoints, reports "preempted"
without failing, and the next call resumes it to the same score as an uninterrupted candidate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.config import load_cfg
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
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

    resumed = run_search_candidate(cfg, 2, 1, tmp_path / "b", DistEnv())
    assert resumed["status"] == "done" and resumed["steps"] == 12
    work = read_events(cand / "work" / "stage_02" / "train" / "events.jsonl")
    assert [e["step"] for e in work if e["event"] == "resume"] == [5]
    for key in ("val_loss", "proxy_acc1", "score", "samples"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
