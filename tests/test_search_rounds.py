"""Multi-fidelity search (issue #17): successive-halving rounds on the search trajectory of the stage's own
training, the winner's training continuing its search state, and what plan/status/report/select show."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_cfg

REPO = Path(__file__).resolve().parents[1]
ROUNDS = [
    "search.trajectory=train",
    "search.rounds=2",
    "search.steps=2",
    "search.keep=0.5",
    "train.steps=8",
    "train.checkpoint_every=3",
    "search.estimator=ema",
    "search.ema_decay=0.5",
]


def jobs_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def rounds_run(tiny_pipeline_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("rounds") / "run"
    args = ["submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2"]
    proc = jobs_cli(*args, *sets(ROUNDS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_config_rounds(tiny_pipeline_config: Path) -> None:
    cfg = load_cfg(tiny_pipeline_config, ROUNDS)
    assert [cfg.search.round_steps(r) for r in (1, 2)] == [2, 4]
    assert [cfg.search.survivors(n) for n in (3, 2, 1, 6)] == [2, 1, 1, 3]
    with pytest.raises(ConfigError, match=r"search\.trajectory=train"):
        load_cfg(tiny_pipeline_config, ["search.rounds=2"])  # a short training of its own cannot resume
    with pytest.raises(ConfigError, match=r"below train\.steps=8"):
        load_cfg(tiny_pipeline_config, [*ROUNDS, "search.steps=4"])  # round 2 would end at step 8
    with pytest.raises(ConfigError, match=r"search\.keep"):
        load_cfg(tiny_pipeline_config, [*ROUNDS, "search.keep=1.0"])


def test_rounds_rank_survivors_and_resume(rounds_run: tuple[Path, str]) -> None:
    run_dir, out = rounds_run
    search = run_dir / "stage_02" / "search"
    ranking = json.loads((search / "round_01.json").read_text())
    assert ranking["steps"] == 2 and len(ranking["survivors"]) == 2  # ceil(3 x 0.5)
    round1 = sorted((r for r in ranking["table"] if r["status"] == "done"), key=lambda r: r["rank"])
    assert [r["index"] for r in round1[:2]] == ranking["survivors"]
    assert [r["score"] for r in round1] == sorted(r["score"] for r in round1)
    dropped = next(r["index"] for r in round1 if r["index"] not in ranking["survivors"])
    for k in range(3):
        res = json.loads((search / f"cand_{k:02d}" / "result.json").read_text())
        train = search / f"cand_{k:02d}" / "work" / "stage_02" / "train"
        if k == dropped:
            assert res["round"] == 1 and res["steps"] == 2 and res["history"] == []
            continue
        assert res["round"] == 2 and res["steps"] == 4 and res["samples"] == 4 * 16 and res["estimator"] == "ema"
        assert [h["steps"] for h in res["history"]] == [2]
        assert Path(res["checkpoint"]).name == "step_00000004.pt"
        kinds = [e["event"] for e in _events(train / "events.jsonl")]
        # round 2 resumed round 1's checkpoint: no step trained twice
        assert kinds.count("start") == 1 and kinds.count("stopped") == 2 and "resume" in kinds
    assert "search round 2" in out and "train on to step 4" in out


def test_winner_continues_its_search_state(rounds_run: tuple[Path, str]) -> None:
    run_dir, _ = rounds_run
    sd = run_dir / "stage_02"
    sel = json.loads((sd / "selected.json").read_text())
    assert sel["rounds"] == 2 and sel["continues"] is True and sel["start_step"] == 4
    ranks = {r["index"]: r.get("rank") for r in sel["table"]}
    assert sorted(ranks.values()) == [1, 2, 3]
    assert ranks[sel["winner"]["index"]] == 1
    dropped = [r for r in sel["table"] if r.get("dropped_after") == 1]
    assert len(dropped) == 1 and dropped[0]["rank"] == 3  # dropped in round 1: below both survivors
    events = _events(sd / "train" / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    assert start["continued_at"] == 4 and start["samples"] == 4 * 16
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps and min(steps) > 4 and max(steps) == 8  # only the steps after the search's
    end = next(e for e in events if e["event"] == "end")
    assert end["samples"] == 8 * 16


def test_report_status_and_resubmit_know_rounds(rounds_run: tuple[Path, str], tiny_pipeline_config: Path) -> None:
    from jobs.engine.report import load_run

    run_dir, _ = rounds_run
    row = next(s for s in load_run(run_dir)["stages"] if s["stage"] == 2)
    cands = [
        json.loads((run_dir / "stage_02" / "search" / f"cand_{k:02d}" / "result.json").read_text()) for k in range(3)
    ]
    win = json.loads((run_dir / "stage_02" / "selected.json").read_text())["winner"]["index"]
    losers = sum(c["train_flops"] for k, c in enumerate(cands) if k != win)
    assert row["search_flops"] == losers and row["continues"] and row["search_rounds"] == 2
    assert row["search_overhead"] == pytest.approx(losers / row["train_flops"])
    report = jobs_cli("report", str(run_dir))
    assert report.returncode == 0 and "search/train" in report.stdout and " 2+ " in report.stdout
    status = jobs_cli("status", str(run_dir))
    assert status.returncode == 0 and "search2=done" in status.stdout and "select1=done" in status.stdout
    jobs = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    assert {j.get("round", 1) for j in jobs if j["step"] in ("search", "select")} == {1, 2}
    again = jobs_cli(
        "submit", "--config", str(tiny_pipeline_config), "--run-dir", str(run_dir), "--stages", "1-2", *sets(ROUNDS)
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(json.loads((run_dir / "jobs.json").read_text())["jobs"]) == len(jobs)  # nothing redone


def test_plan_shows_rounds_before_the_search(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    proc = jobs_cli(
        "plan", "--config", str(tiny_pipeline_config), "--run-dir", str(tmp_path / "run"), *sets(ROUNDS),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "search round 2" in proc.stdout and "select round 2" in proc.stdout
    assert "survivors known once round 1 is ranked: array of 2 (upper bound)" in proc.stdout
    assert "dependency afterok:<stage2.select.round1>" in proc.stdout  # round 2 waits for round 1's ranking
    assert "dependency afterok:<stage2.select.round2>" in proc.stdout  # the training waits for the last ranking


def test_power_law_fit_and_halving_replay() -> None:
    """fidelity: the fit recovers a known law; halving replays rounds on curves and counts the losers' steps."""
    from jobs.engine.fidelity import Curve, estimate, fit_power_law, grade, halving

    steps = [20, 40, 60, 80, 100]
    a, c, alpha = fit_power_law(steps, [1.0 + 3.0 * s**-0.5 for s in steps]) or (0, 0, 0)
    assert (a, c, alpha) == pytest.approx((1.0, 3.0, 0.5), abs=1e-6)

    def curve(k: int, floor: float, speed: float, acc: float) -> Curve:
        pts = tuple(range(20, 401, 20))
        return Curve(k, f"c{k}", pts, tuple(floor + speed * s**-0.5 for s in pts), (None,) * len(pts),
                     (None,) * len(pts), floor + speed * 400**-0.5, acc, 10.0)  # fmt: skip

    # c0 learns fast but ends worst; c2 starts slow and ends best: short budgets rank them the wrong way
    curves = [curve(0, 2.0, 1.0, 0.10), curve(1, 1.5, 6.0, 0.20), curve(2, 1.0, 12.0, 0.30)]
    assert estimate(curves[0], 20, "loss", 400) < estimate(curves[2], 20, "loss", 400)
    assert estimate(curves[2], 100, "extrapolate", 400) == pytest.approx(curves[2].final_val_loss, rel=1e-3)
    rows = {(r["estimator"], r["budget"]): r for r in grade(curves, [20, 100], 400)}
    assert rows[("loss", 20)]["tau_val_loss"] == pytest.approx(-1.0) and rows[("loss", 20)]["regret_mean_acc1"] > 0
    assert rows[("extrapolate", 100)]["tau_val_loss"] == pytest.approx(1.0)
    assert ("ema", 20) not in rows and ("refit", 20) not in rows  # not recorded: not graded
    sh = halving(curves, "extrapolate", 100, 0.5, 2, 400)
    assert sh["pick"] == "c2" and sh["regret_mean_acc1"] == pytest.approx(0.0)
    # round 1: 3 x 100 steps; round 2: the 2 survivors to 200; the winner's 200 are its training's
    assert sh["candidate_steps"] == 100 + 200 + 200 and sh["overhead"] == pytest.approx((100 + 200) * 10.0 / 4000)


def test_validation_leaves_the_trajectory_unchanged(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """train.val_every adds held-out loss to the metric records (JSONL and HDF5) without changing the weights."""
    import h5py
    import torch

    from jobs.engine.dist import DistEnv
    from jobs.engine.trainer import run_training

    runs = {}
    for every in (0, 3):
        cfg = load_cfg(tiny_pipeline_config, [f"train.val_every={every}", "train.ema_decay=0.9"])
        res = run_training(cfg, 1, tmp_path / f"v{every}", DistEnv(), progress=False)
        runs[every] = res
    a = torch.load(runs[0].final, weights_only=True)["model"]
    b = torch.load(runs[3].final, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [e for e in _events(runs[3].train_dir / "events.jsonl") if e["event"] == "train"]
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    assert all(r["val_loss"] > 0 and r["val_loss_se"] >= 0 and "val_loss_ema" in r for r in recs if "val_loss" in r)
    assert all(0 < r["val_loss_refit"] <= r["val_loss"] + 1e-9 for r in recs if "val_loss" in r)
    with h5py.File(runs[3].train_dir / "metrics.h5") as f:
        assert len(f["val_loss"]) == len(recs) and not any(map(math.isnan, f["val_loss"][:]))


def test_fidelity_cli_on_oracle_curves(tiny_pipeline_config: Path, tmp_path: Path) -> None:
    """`jobs fidelity` reads the oracle's curves, prints both tables and writes oracle/fidelity.json."""
    from data_tools.atomic import atomic_write_json

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny_pipeline_config.read_text())
    for k, (floor, speed) in enumerate([(2.0, 1.0), (1.0, 12.0)]):
        curve = [{"step": s, "val_loss": floor + speed * s**-0.5} for s in (2, 4, 6)]
        atomic_write_json(
            run_dir / "stage_02" / "oracle" / f"cand_{k:02d}" / "result.json",
            {"index": k, "name": f"c{k}", "val_loss": floor + speed * 6**-0.5, "mean_acc1": 0.1 * (k + 1),
             "train_flops": 600, "steps": 6, "curve": curve},
        )  # fmt: skip
    proc = jobs_cli("fidelity", "--run-dir", str(run_dir), "--stage", "2", "--budgets", "2,6", "--halving", "2,0.5,2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extrapolate" in proc.stdout and "steps 2 keep 0.5 x2" in proc.stdout
    rep = json.loads((run_dir / "stage_02" / "oracle" / "fidelity.json").read_text())
    full = next(r for r in rep["grade"] if r["estimator"] == "loss" and r["budget"] == 6)
    assert full["tau_val_loss"] == pytest.approx(1.0) and full["pick"] == "c0"
    bad = jobs_cli("fidelity", "--run-dir", str(run_dir), "--stage", "3")
    assert bad.returncode == 2 and "train.val_every" in bad.stderr
