"""Resume (issue #5): SIGKILL + resume reproduces the uninterrupted losses; preemption checkpoints
mid-segment; a corrupt newest checkpoint falls back to the previous one; last K kept.

Tolerance: resumed losses must equal the uninterrupted run's within 1e-6 absolute (CPU, same thread
count; in practice they are bit-identical: model, optimizer, scheduler and RNG states are restored
and the data stream is re-created at the saved position).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.config import load_cfg
from jobs.engine.checkpoint import (
    CheckpointError,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
from jobs.engine.train_state import TrainState
from jobs.engine.trainer import run_training
from tests.helpers import stop_at

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6


def step_losses(train_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(train_dir / "events.jsonl") if e["event"] == "train"}


def train_cmd(config: Path, run_dir: Path) -> list[str]:
    return ["train", "--config", str(config), "--stage", "2", "--run-dir", str(run_dir), "--no-eval"]


@pytest.fixture(scope="module")
def reference(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of an uninterrupted 40-step run of stage 2 (checkpoint every 10, log every step)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", *train_cmd(tiny_config, run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = step_losses(run_dir / "stage_02" / "train")
    assert sorted(losses) == list(range(1, 41))
    return losses


def assert_same_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref)
    worst = max(abs(got[s] - ref[s]) for s in ref)
    print(f"resume: max |Δloss| vs uninterrupted = {worst:.3g}")
    assert worst <= TOL, f"max |Δloss| = {worst:.3g} > {TOL}"


# A real SIGKILL of the training process at step 25 (5 steps after the step-20 checkpoint): the
# driver patches the metrics writer to kill its own process right after step 25's record.
KILL_DRIVER = """
import os, signal, sys
from jobs.engine import metrics
real = metrics.MetricsLog.step
def step(self, **rec):
    real(self, **rec)
    if rec["step"] == 25:
        os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricsLog.step = step
from jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_matches_uninterrupted(reference, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    td = run_dir / "stage_02" / "train"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, *train_cmd(tiny_config, run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(step_losses(td)) == 25 and not (td / "final.pt").exists()
    assert [s for s, _ in list_checkpoints(td / "checkpoints")] == [10, 20]
    resumed = subprocess.run(
        [sys.executable, "-m", "jobs", *train_cmd(tiny_config, run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000020.pt at step 20" in resumed.stderr
    events = read_events(td / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [20]
    assert_same_losses(step_losses(td), reference)  # steps 21..25 were dropped and redone
    assert load_checkpoint(td / "final.pt")["step"] == 40


def test_preemption_mid_segment_then_resume(reference, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_cfg(tiny_config)
    first = run_training(cfg, 2, tmp_path, DistEnv(), should_stop=stop_at(15))
    assert first.status == "preempted" and first.step == 15
    payload = load_checkpoint(first.last_checkpoint)
    assert payload["data"]["segment_start"] == 10 and payload["data"]["offset"] == 5  # fast-forward on resume
    second = run_training(cfg, 2, tmp_path, DistEnv())
    assert second.status == "completed" and second.step == 40
    assert_same_losses(step_losses(second.train_dir), reference)
    again = run_training(cfg, 2, tmp_path, DistEnv())  # a re-submitted finished stage does nothing
    assert again.status == "already_done" and again.step == 40


def test_corrupt_newest_falls_back_to_previous(reference, tiny_config: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cfg = load_cfg(tiny_config)
    first = run_training(cfg, 2, tmp_path, DistEnv(), should_stop=stop_at(25))
    ckpt_dir = first.train_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [10, 20, 25]
    newest = ckpt_dir / "step_00000025.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum must catch it
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        second = run_training(cfg, 2, tmp_path, DistEnv())
    assert "checkpoint step 25 is unusable, falling back to the previous one" in caplog.text
    events = read_events(second.train_dir / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [20]
    assert_same_losses(step_losses(second.train_dir), reference)


def test_a_first_save_killed_before_its_checksum_starts_over(
    reference, tiny_config: Path, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    """The only checkpoint lacks its sidecar (SIGKILL between the rename and the checksum): start from scratch.
    The only checkpoint fails its checksum (damage to finished work): refuse, naming the fix."""
    cfg = load_cfg(tiny_config)
    first = run_training(cfg, 2, tmp_path / "a", DistEnv(), should_stop=stop_at(10))
    ckpt_dir = first.train_dir / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [10]
    damaged = tmp_path / "b" / "stage_02" / "train" / "checkpoints"
    shutil.copytree(ckpt_dir, damaged)
    (ckpt_dir / "step_00000010.pt.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        second = run_training(cfg, 2, tmp_path / "a", DistEnv())
    assert "no checksum file: the first save of this stage was interrupted" in caplog.text
    assert second.status == "completed" and second.step == 40
    assert not [e for e in read_events(second.train_dir / "events.jsonl") if e["event"] == "resume"]
    assert_same_losses(step_losses(second.train_dir), reference)

    data = bytearray((damaged / "step_00000010.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "step_00000010.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is unusable.*move them away"):
        run_training(cfg, 2, tmp_path / "b", DistEnv())


def test_checkpoint_io_failures_and_pruning(tmp_path: Path) -> None:
    payload = {"format": "growclip-checkpoint", "version": 1, "step": 1, "w": torch.arange(4.0)}
    for step in (1, 2, 3, 4):
        save_checkpoint({**payload, "step": step}, tmp_path / f"step_{step:08d}.pt")
    assert load_checkpoint(tmp_path / "step_00000004.pt")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    # newest: sidecar missing (crash between the two renames); previous: truncated; then: good
    (tmp_path / "step_00000004.pt.sha256").unlink()
    p3 = tmp_path / "step_00000003.pt"
    p3.write_bytes(p3.read_bytes()[:100])
    path, loaded = find_resume(tmp_path)
    assert path.name == "step_00000002.pt" and loaded["step"] == 2
    with pytest.raises(CheckpointError, match="checksum file"):
        load_checkpoint(tmp_path / "step_00000004.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(p3, verify=False)
    gone = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in gone] == ["step_00000001.pt", "step_00000002.pt"]
    assert sorted(os.listdir(tmp_path)) == ["step_00000003.pt", "step_00000003.pt.sha256", "step_00000004.pt"]
    shutil.rmtree(tmp_path)
    assert find_resume(tmp_path) is None


TRAINING_KEYS = ["format", "version", "step", "samples_seen", "stage", "spec", "model", "optimizer", "scheduler"]
TRAINING_KEYS += ["scaler", "ema", "rng", "data", "growth_history", "config", "init", "tokenizer_sha256"]
TRAINING_KEYS += ["world_size", "torch_version"]
GROWN_KEYS = ["format", "version", "step", "samples_seen", "stage", "spec", "model", "optimizer", "ema"]
GROWN_KEYS += ["growth_history", "config", "init", "tokenizer_sha256"]


def _tiny_state(ema_decay: float) -> TrainState:
    from model import build_model
    from model.spec import TINY

    tc = load_cfg(None, ["train.steps=4", "train.warmup_steps=1", f"train.ema_decay={ema_decay}"]).train
    model = build_model(TINY, seed=0)
    return TrainState.build(TINY, model, tc, torch.device("cpu"), stage=2, config={"train": {}}, growth_history=[])


def test_train_state_is_the_one_payload(tmp_path: Path) -> None:
    """Every writer's payload comes from TrainState.state_dict (jobs/README.md "Checkpoint format"); a training
    state's round trip through a checkpoint restores weights, optimizer, schedule, EMA, step and samples."""
    from model.pim import random_inputs

    state = _tiny_state(0.9)
    images, tokens = random_inputs(state.spec, batch=4)
    img, txt, scale = state.model(images.float(), tokens)
    (scale * (img @ txt.T)).logsumexp(dim=1).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update(state.model)
    state.step, state.samples_seen = 1, 4
    data = {"segment_start": 0, "offset": 1, "streams": 1, "per_stream": 4}
    save_checkpoint(state.state_dict(data, world_size=1), tmp_path / "step.pt")
    payload = load_checkpoint(tmp_path / "step.pt")
    assert list(payload) == TRAINING_KEYS and payload["data"] == data and payload["stage"] == 2

    fresh = _tiny_state(0.9)
    fresh.load_state_dict(payload)
    assert (fresh.step, fresh.samples_seen) == (1, 4)
    again = fresh.state_dict(data, world_size=1)
    for key in ("model", "ema"):
        for name, tensor in payload[key].items():
            torch.testing.assert_close(again[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    for pid, moments in payload["optimizer"]["state"].items():
        for name, tensor in moments.items():
            torch.testing.assert_close(again["optimizer"]["state"][pid][name], tensor, rtol=0, atol=0)
    assert again["scheduler"] == payload["scheduler"]

    grown = TrainState(2, state.spec, state.model, {"train": {}}, [{"op": "x"}], init="prev/final.pt")
    model_only = grown.state_dict()  # search.grow_checkpoint's payload: the --init of the next training
    assert list(model_only) == GROWN_KEYS and model_only["optimizer"] is None and model_only["ema"] is None
    assert (model_only["step"], model_only["samples_seen"], model_only["init"]) == (0, 0, "prev/final.pt")
