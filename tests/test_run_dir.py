"""Jobs own their run dir (issue #14 item 3): a run dir made with one resolved config refuses another.

Before: ``jobs train`` on a finished run dir with a different config printed "already trained" and exited
0, ignoring the new values; resuming with another optimizer crashed at the first step
(``KeyError: 'bias_correction'``). The table-driven CLI test (tests/test_reliability_cli.py) covers the
refusals that need no trained model; these need one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main as jobs_main
from jobs.config import ConfigError, dump_cfg, load_cfg
from jobs.engine.rundir import check_run_dir

REPO = Path(__file__).resolve().parents[1]
# the overrides the session's trained_run fixture (tests/conftest.py) was trained with
TRAINED = ["train.steps=200", "train.batch_size=64", "train.warmup_steps=20", "train.checkpoint_every=50"]
TRAINED += ["train.log_every=5"]


def _train(config: Path, run_dir: Path, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "jobs", "train", "--config", str(config), "--stage", "1", "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run([*argv, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_finished_run_dir_refuses_another_config(trained_run) -> None:  # type: ignore[no-untyped-def]
    final = trained_run.train_dir / "final.pt"
    before = final.read_bytes()
    same = _train(trained_run.config, trained_run.run_dir, *TRAINED, "cluster.mem_gb=3")  # launch keys may change
    assert same.returncode == 0 and "already trained" in same.stderr, same.stderr[-2000:]
    other = _train(trained_run.config, trained_run.run_dir, *TRAINED[1:], "train.steps=300")
    assert other.returncode == 2, other.stderr[-2000:]
    err = other.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the run dir was made with another config: train.steps: 200 -> 300 (")
    assert "use a new --run-dir" in err and "Traceback" not in other.stderr
    assert final.read_bytes() == before  # nothing was touched


def test_resume_with_another_optimizer_refuses(trained_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ckpt = trained_run.train_dir / "final.pt"
    proc = _train(trained_run.config, tmp_path / "new", *TRAINED, "train.optimizer=lamb", extra=("--resume", str(ckpt)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "the optimizer state of the checkpoint does not fit this config: train.optimizer: 'adamw' -> 'lamb'" in err
    assert str(ckpt) in err and "--init CKPT" in err and "Traceback" not in proc.stderr


def test_a_run_config_that_no_longer_loads_is_named(tiny_config: Path, tmp_path: Path) -> None:
    cfg = load_cfg(tiny_config)
    (tmp_path / "config.yaml").write_text(dump_cfg(cfg) + "retired_section: {}\n")
    with pytest.raises(ConfigError, match=r"config no longer loads: .*retired_section.*use a new --run-dir"):
        check_run_dir(tmp_path, cfg)
    (tmp_path / "config.yaml").write_text(dump_cfg(cfg).replace("  grad_clip: 1.0\n", ""))  # a key added since
    assert check_run_dir(tmp_path, cfg) == tmp_path / "config.yaml"


def test_an_unexpected_exception_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import jobs.report

    def boom(args):  # type: ignore[no-untyped-def]
        raise KeyError("bias_correction")

    monkeypatch.setattr(jobs.report, "cmd_runs", boom)
    assert jobs_main(["runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: KeyError: 'bias_correction' (python -m jobs runs);")
    assert "GROWCLIP_TRACEBACK=1" in err
    monkeypatch.setenv("GROWCLIP_TRACEBACK", "1")
    assert jobs_main(["runs", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_submit_train_freezes_the_resolved_config(tiny_config: Path, tmp_path: Path) -> None:
    """A queued or requeued job reads RUN_DIR/config.yaml, never the user's file again."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(tiny_config.read_text())
    run_dir = tmp_path / "run"
    sets = ["--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.checkpoint_every=2"]
    argv = ["submit-train", "--config", str(mine), "--stage", "1", "--run-dir", str(run_dir), "--executor", "debug"]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", *argv, *sets], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # debug: the job runs when its result is asked for
    frozen = load_cfg(run_dir / "config.yaml")
    assert frozen.train.steps == 4 and frozen.data.root.is_absolute()
    mine.write_text("train: {steps: not a number}\n")  # the user edits the file: the job's config is unchanged
    assert load_cfg(run_dir / "config.yaml") == frozen
