"""Training job (issue #5): loss falls, run-dir layout, metrics, checkpoint content, failures, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from jobs.config import load_cfg
from jobs.engine.checkpoint import load_checkpoint
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import SERIES, read_events
from jobs.engine.trainer import NonFiniteLossError, TrainingOOMError, lr_factor, run_training

REPO = Path(__file__).resolve().parents[1]


def jobs_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def step_losses(train_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(train_dir / "events.jsonl") if e["event"] == "train"}


def test_loss_falls_and_run_dir_layout(trained_run) -> None:  # type: ignore[no-untyped-def]
    td = trained_run.train_dir
    losses = step_losses(td)
    assert sorted(losses) == list(range(5, 201, 5))
    first, last = [losses[s] for s in (5, 10, 15)], [losses[s] for s in (190, 195, 200)]
    # log(64) = 4.16 is chance; the tiny model gets well below it within 200 steps
    assert sum(last) / 3 < sum(first) / 3 - 0.4, (first, last)
    for name in ("config.yaml", "spec.json", "events.jsonl", "metrics.h5", "final.pt", "final.pt.sha256"):
        assert (td / name).is_file(), name
    ckpts = sorted(p.name for p in (td / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_00000050.pt", "step_00000100.pt", "step_00000150.pt"]  # keep_checkpoints=3
    assert (trained_run.run_dir / "stage_01" / "eval" / "metrics.json").is_file()
    assert "kernels: {" in trained_run.stderr and "adamw" in trained_run.stderr  # kernels named in the log


def test_events_and_metrics_h5(trained_run) -> None:  # type: ignore[no-untyped-def]
    events = read_events(trained_run.train_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and "end" in kinds and kinds[-1] == "eval"
    rec = next(e for e in events if e["event"] == "train")
    for key in ("step", "loss", "lr", "samples_per_s", "grad_norm", "logit_scale", "memory_mb", "stage_mix"):
        assert key in rec, key
    assert rec["stage_mix"] == {"1": 1.0}
    with h5py.File(trained_run.train_dir / "metrics.h5") as f:
        for name, _ in SERIES:
            assert f[name].shape == (40,) and f[name].maxshape == (None,), name
        assert f["step"][-1] == 200 and f["stage_mix/stage_01"][0] == 1.0
        assert f["loss"][-1] == pytest.approx(step_losses(trained_run.train_dir)[200])


def test_final_checkpoint_content(trained_run) -> None:  # type: ignore[no-untyped-def]
    payload = load_checkpoint(trained_run.train_dir / "final.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "rng", "step", "samples_seen", "data", "spec"):
        assert key in payload, key
    assert payload["step"] == 200 and payload["samples_seen"] == 200 * 64 and payload["stage"] == 1
    assert payload["growth_history"] == [] and payload["config"]["train"]["steps"] == 200
    assert set(payload["data"]) >= {"segment_start", "offset", "streams"}
    cfg = load_cfg(trained_run.config, ["train.steps=200"])
    assert payload["spec"] == cfg.model.to_dict()
    # weight decay: none on norms, biases, embeddings, logit scale
    groups = payload["optimizer"]["param_groups"]
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["param_names"]
    assert {"logit_scale", "text.token_embedding.weight", "visual.pos_embed", "visual.norm.weight"} <= set(no_decay)


def test_init_ema_lamb_accum_grad_checkpointing(trained_run, tiny_config: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    final = trained_run.train_dir / "final.pt"
    overrides = ["train.steps=3", "train.warmup_steps=1", "train.ema_decay=0.9", "train.grad_checkpointing=true"]
    overrides += ["train.optimizer=lamb", "train.grad_accum=2"]
    cfg = load_cfg(tiny_config, overrides)
    result = run_training(cfg, 2, tmp_path / "run", DistEnv(), init=final)
    payload = load_checkpoint(result.final)
    assert result.status == "completed" and payload["stage"] == 2 and payload["ema"] is not None
    events = read_events(result.train_dir / "events.jsonl")
    assert events[0]["init"] == str(final)
    assert events[1]["stage_mix_target"] == {"1": 0.5, "2": 0.5}  # replay_fraction 0.5 over stages 1..2
    assert set(events[1]["stage_mix"]) == {"1", "2"} and sum(events[1]["stage_mix"].values()) == pytest.approx(1)


def test_lr_schedule_warmup_then_cosine(tiny_config: Path) -> None:
    tc = load_cfg(tiny_config, ["train.steps=100", "train.warmup_steps=10", "train.min_lr=1e-4"]).train
    assert lr_factor(0, tc) == pytest.approx(0.1) and lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(10, tc) == pytest.approx(1.0) and lr_factor(100, tc) == pytest.approx(0.1)
    assert lr_factor(55, tc) == pytest.approx(0.1 + 0.9 * 0.5)


def test_nonfinite_loss_names_step_and_checkpoint(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from model.loss import ClipLoss

    calls = {"n": 0}
    real = ClipLoss.forward

    def poisoned(self, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] == 13 else loss

    monkeypatch.setattr(ClipLoss, "forward", poisoned)
    cfg = load_cfg(tiny_config, ["train.steps=20"])
    with pytest.raises(NonFiniteLossError, match=r"at step 13 .*step_00000010\.pt"):
        run_training(cfg, 1, tmp_path / "run", DistEnv())


def test_nonfinite_loss_cli_exit_1(tiny_config: Path, tmp_path: Path) -> None:
    proc = jobs_cli(
        "train", "--config", str(tiny_config), "--stage", "1", "--run-dir", str(tmp_path / "r"),
        "--set", "train.lr=1e30", "--set", "train.warmup_steps=0",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr


def test_oom_names_batch_size(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from model.loss import ClipLoss

    def oom(self, *args):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ClipLoss, "forward", oom)
    with pytest.raises(TrainingOOMError, match=r"train\.batch_size=32.*--set train\.batch_size=16"):
        run_training(load_cfg(tiny_config), 1, tmp_path / "run", DistEnv())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--stage", "1", "--run-dir", "x"], "--config"),
        (["train", "--config", "{cfg}", "--stage", "0", "--run-dir", "x"], "positive integer"),
        (["train", "--config", "{cfg}", "--stage", "4", "--run-dir", "x"], "data.stages=3"),
        (["train", "--config", "{cfg}", "--stage", "1", "--run-dir", "x", "--set", "train.lrr=1"], "Did you mean"),
        (["train", "--config", "missing.yaml", "--stage", "1", "--run-dir", "x"], "config file not found"),
        (
            ["train", "--config", "{cfg}", "--stage", "1", "--run-dir", "{tmp}/r", "--set", "train.data_streams=3"],
            "divisible",
        ),
        (
            ["train", "--config", "{cfg}", "--stage", "1", "--run-dir", "{tmp}/r", "--set", "model.text.vocab_size=64"],
            "--set model.text.vocab_size=",
        ),
        (["evaluate", "--checkpoint", "x.pt"], "--data-root"),
        (["evaluate", "--checkpoint", "x.pt", "--data-root", "{tmp}"], "eval/tasks.json not found"),
        (["evaluate", "--checkpoint", "x.pt", "--data-root", "{data}", "--weights", "best"], "invalid choice"),
    ],
)
def test_bad_cli_args_exit_2(args: list[str], needle: str, tiny_config: Path, tmp_path: Path) -> None:
    data = load_cfg(tiny_config).data.root
    argv = [a.format(cfg=tiny_config, tmp=tmp_path, data=data) for a in args]
    proc = jobs_cli(*argv, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert needle in proc.stderr, proc.stderr[-2000:]


def test_evaluate_missing_checkpoint_exit_1(tiny_config: Path, tmp_path: Path) -> None:
    data = load_cfg(tiny_config).data.root
    proc = jobs_cli("evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data-root", str(data), timeout=120)
    assert proc.returncode == 1 and "no such checkpoint" in proc.stderr, proc.stderr[-2000:]


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    from model import build_model
    from model.pim import random_inputs
    from model.spec import TINY

    spec = TINY.with_changes(shared={"depth": 1})
    images, tokens = random_inputs(spec, batch=3)
    images = images.float()
    grads = []
    for enable in (False, True):
        model = build_model(spec, seed=0)
        model.set_grad_checkpointing(enable)
        img, txt, scale = model(images, tokens)
        (scale * (img @ txt.T)).logsumexp(dim=1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
