"""The training state of one stage and its ONE conversion to and from a checkpoint payload (R14).

:class:`TrainState` owns what a checkpoint restores: model, optimizer, LR schedule, loss scaler, EMA,
the optimizer steps done and the samples seen, plus the description a checkpoint carries (stage,
ArchSpec, resolved config, growth history, ``--init``). :meth:`TrainState.state_dict` is the payload
every checkpoint writer saves (the trainer's step and final checkpoints, ``search.grow_checkpoint``'s
grown model) and :meth:`TrainState.load_state_dict` is how a resume reads it back; the format is
jobs/README.md "Checkpoint format" (``growclip-checkpoint``, version 1).

The LR schedule is DESIGN.md step 3's: linear warmup, then cosine to ``train.min_lr``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs.config import TrainCfg
from jobs.engine.checkpoint import FORMAT, VERSION
from model.spec import ArchSpec

__all__ = ["StateDict", "Ema", "TrainState", "lr_factor", "rng_state", "set_rng_state", "seed_everything"]

StateDict = dict[str, torch.Tensor]


def lr_factor(step: int, cfg: TrainCfg) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """The process's torch, CUDA, python and numpy RNG states as plain data (``weights_only`` loadable)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (a fresh training starts from ``train.seed``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Ema:
    """Exponential moving average of the weights: ema = d·ema + (1-d)·θ after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def load_state_dict(self, state: StateDict) -> None:
        """Take a saved average, as float32 on the device of the model it follows (a checkpoint loads on CPU)."""
        self.state = {k: v.to(self.state[k].device, torch.float32) for k, v in state.items()}


@dataclass(eq=False)
class TrainState:
    """Everything a checkpoint holds about one stage's training.

    A *training* state (built by :meth:`build`) has an optimizer, schedule and scaler and saves resumable
    checkpoints. A *model-only* state (``optimizer=None``: a grown model, saved as the ``--init`` of the next
    training) saves the weights and the description only.
    """

    stage: int  # growth stage t
    spec: ArchSpec  # the architecture: the model is rebuilt from it
    model: nn.Module  # the plain module (never the DDP or compiled wrapper: its keys are the checkpoint's)
    config: dict[str, Any]  # the resolved RunCfg as a dict, saved with every checkpoint
    growth_history: list[dict[str, Any]]  # GrowthRecord.to_dict() of every growth up to this model
    init: str | None = None  # the checkpoint this training started from (--init), or what was grown
    tokenizer: str | None = None  # SHA-256 of the run's tokenizer.json (jobs/engine/tokens.py); None before #18
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: Ema | None = None
    step: int = 0  # optimizer steps done
    samples_seen: int = 0

    @classmethod
    def build(
        cls,
        spec: ArchSpec,
        model: nn.Module,
        tc: TrainCfg,
        device: torch.device,
        *,
        stage: int,
        config: dict[str, Any],
        growth_history: list[dict[str, Any]],
        init: str | None = None,
        tokenizer: str | None = None,
    ) -> TrainState:
        """A fresh training state around ``model`` (built from ``spec``, initialised or inherited; moved to
        ``device`` here): its optimizer (no weight decay on norms, biases, embeddings, logit scale), LR schedule,
        a disabled scaler, and the EMA when ``tc.ema_decay > 0`` (it starts from the model's weights)."""
        from model.kernels import make_optimizer, param_groups

        model.set_grad_checkpointing(tc.grad_checkpointing)
        model.low_precision_residual = tc.bf16_residual  # only acts under autocast
        model.to(device)
        optimizer = make_optimizer(
            param_groups(model, tc.weight_decay), tc.optimizer, tc.lr, tuple(tc.betas), tc.eps, tc.weight_decay, device
        )
        # a lambda, not a partial: LambdaLR saves a callable object's __dict__ into its state dict, a function's not
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
        scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16/fp32 need no loss scaling
        ema = Ema(model, tc.ema_decay) if tc.ema_decay > 0 else None
        return cls(stage, spec, model, config, growth_history, init, tokenizer, optimizer, scheduler, scaler, ema)

    def state_dict(self, data: dict[str, int] | None = None, world_size: int = 1) -> dict[str, Any]:
        """The checkpoint payload: plain data only (``torch.load(weights_only=True)``).

        Args:
            data: the data position (``BatchStream.position`` plus the stream layout ``streams``,
                ``per_stream``); required for a training state.
            world_size: the number of processes that trained (a training state records it).

        A model-only state gives ``optimizer`` and ``ema`` None and nothing of a run (schedule, scaler, RNG,
        data position, world size, torch version).
        """
        head = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "stage": self.stage,
            "spec": self.spec.to_dict(),
            "model": self.model.state_dict(),
        }
        tail = {"growth_history": self.growth_history, "config": self.config, "init": self.init}
        tail["tokenizer_sha256"] = self.tokenizer
        ema = self.ema.state if self.ema is not None else None
        if self.optimizer is None:
            return {**head, "optimizer": None, "ema": ema, **tail}
        assert self.scheduler is not None and self.scaler is not None, "a training state has a schedule and scaler"
        assert data is not None, "a training checkpoint records its data position"
        return {
            **head,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": ema,
            "rng": rng_state(),
            "data": data,
            **tail,
            "world_size": world_size,
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Resume from a payload of :meth:`state_dict`: weights, optimizer, schedule, scaler, EMA, RNG states,
        step and samples seen. The description (stage, spec, config, growth history, init) stays this state's;
        the data position is the caller's (``payload["data"]``).

        Raises:
            RuntimeError: the weights do not fit the model (strict loading).
        """
        self.model.load_state_dict(payload["model"], strict=True)
        if self.optimizer is not None:
            assert self.scheduler is not None and self.scaler is not None, "a training state has a schedule and scaler"
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
            if self.ema is not None and payload.get("ema") is not None:
                self.ema.load_state_dict(payload["ema"])
            set_rng_state(payload["rng"])
        self.step, self.samples_seen = int(payload["step"]), int(payload["samples_seen"])
