"""The step loop of one stage's training (DESIGN.md step 3: train the selected model on D_<=t).

The third layer under ``jobs/train.py`` (job) → ``jobs.engine.trainer.run_training`` (wiring), as MAE's
``engine_pretrain.train_one_epoch``: :func:`train_steps` takes the pieces it needs (a
:class:`~jobs.engine.train_state.TrainState`, a :class:`~jobs.engine.data.BatchStream`, the ``train``
section, the batch split, the run dirs, the :class:`~jobs.engine.dist.DistEnv`), never the whole RunCfg.

Per optimizer step: ``grad_accum`` micro-batches (DDP ``no_sync`` on all but the last), symmetric
InfoNCE over the global batch (features all-gathered; the loss is scaled by the world size before
backward so that DDP's gradient *average* equals the single-process gradient of the same global
batch), grad clipping, AdamW/LAMB step, cosine schedule with linear warmup, optional EMA. At every
step boundary ``should_stop`` is polled (all ranks agree through an all-reduce); when it is True the
loop checkpoints and returns ``status="preempted"``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs.config import TrainCfg
from jobs.engine.checkpoint import checkpoint_name, prune_checkpoints
from jobs.engine.data import BatchStream
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import MetricsLog
from jobs.engine.rundir import TrainDir
from jobs.engine.train_state import TrainState

if TYPE_CHECKING:
    from model.kernels import CompileMode

__all__ = [
    "Batching",
    "Forward",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingOOMError",
    "train_steps",
    "uses_bf16",
    "wrap_model",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingOOMError(RuntimeError):
    """Out of memory; the message names the batch size to lower."""


@dataclass(frozen=True)
class TrainResult:
    """What a training ended with."""

    status: Literal["completed", "preempted", "stopped", "already_done"]  # stopped: at ``stop_at`` (a search round)
    step: int  # optimizer steps done
    train_dir: Path
    final: Path | None  # final.pt when completed
    last_checkpoint: Path | None


@dataclass(frozen=True)
class Batching:
    """Global batch B = world W x streams-per-rank x per-stream micro-batch x grad_accum A."""

    global_batch: int
    grad_accum: int
    streams: int
    per_stream: int
    per_rank_micro: int


@dataclass(frozen=True)
class Forward:
    """The model as a step runs it: ``ddp`` provides ``no_sync`` (the DDP wrapper; the plain model on one
    process), ``call`` is what is called (``torch.compile`` of ``ddp`` when compiling, else ``ddp``), ``loss``
    the symmetric InfoNCE over the global batch."""

    ddp: nn.Module
    call: Callable[..., Any]
    loss: nn.Module


def wrap_model(model: nn.Module, env: DistEnv, compile_mode: CompileMode) -> Forward:
    """DDP (when distributed), then ``train.compile``, and the loss of ``env``'s rank."""
    from model.kernels import maybe_compile
    from model.loss import ClipLoss

    ddp: nn.Module = model
    if env.distributed:
        ddp = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    # Only the forward goes through the compiled wrapper (DDP first, then compile: DDPOptimizer splits the
    # graph at the gradient buckets). Everything else (checkpoints, EMA, clipping, logging, growth) keeps
    # using ``model``, whose state-dict keys the compiled wrapper would prefix with ``_orig_mod.``.
    call = maybe_compile(ddp, env.device, compile_mode)
    return Forward(ddp, call, ClipLoss(rank=env.rank, world_size=env.world_size))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """train.precision: bf16, or auto on CUDA, means bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _oom_message(step: int, tc: TrainCfg, env: DistEnv, batching: Batching) -> str:
    b = tc.batch_size
    return (
        f"out of memory at step {step + 1} with a per-rank micro-batch of {batching.per_rank_micro} "
        f"(train.batch_size={b} over {env.world_size} ranks x grad_accum {tc.grad_accum}): lower "
        f"train.batch_size (e.g. --set train.batch_size={max(b // 2, 1)}), raise train.grad_accum "
        f"(e.g. {tc.grad_accum * 2}) or set train.grad_checkpointing=true"
    )


def _forward_backward(fwd: Forward, stream: BatchStream, precision: str, env: DistEnv, accum: int) -> float:
    """Forward + backward of ``accum`` micro-batches (DDP syncs on the last); returns the mean loss."""
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(accum):
        images, tokens = stream.next()
        images, tokens = images.to(env.device, non_blocking=True), tokens.to(env.device, non_blocking=True)
        sync = micro == accum - 1 or not env.distributed
        with contextlib.nullcontext() if sync else fwd.ddp.no_sync():
            with _autocast(precision, env.device):
                img, txt, scale = fwd.call(images, tokens)
                loss = fwd.loss(img.float(), txt.float(), scale.float())
            # x world_size: DDP averages gradients, but with gathered features each rank's backward
            # yields only its share of the global loss's gradient (jobs/README.md)
            (loss * env.world_size / accum).backward()
        loss_sum += loss.detach()
    return (loss_sum / accum).item()


def _apply_update(state: TrainState, grad_clip: float) -> float:
    """Clip, step optimizer and schedule, update the EMA; returns the grad norm before clipping."""
    assert state.optimizer is not None and state.scheduler is not None, "a training state has an optimizer"
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip).item()
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
    return grad_norm


def _stop_requested(should_stop: Callable[[], bool], env: DistEnv) -> bool:
    """``should_stop()`` of any rank (all-reduced: every rank stops at the same step)."""
    flag = bool(should_stop())
    if env.distributed:
        t = torch.tensor([int(flag)], device=env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def _log_record(state: TrainState, tc: TrainCfg, record: dict[str, Any]) -> None:
    logger.info(
        "stage %d step %d/%d loss %.4f lr %.2e grad_norm %.3f logit_scale %.2f %.1f samples/s",
        state.stage,
        state.step,
        tc.steps,
        record["loss"],
        record["lr"],
        record["grad_norm"],
        record["logit_scale"],
        record["samples_per_s"],
    )


def train_steps(
    state: TrainState,
    stream: BatchStream,
    fwd: Forward,
    tc: TrainCfg,
    batching: Batching,
    env: DistEnv,
    dirs: TrainDir,
    metrics: MetricsLog,
    save: Callable[[Path], Path],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    last_checkpoint: Path | None = None,
    progress: bool | None = None,
    stop_at: int | None = None,
    validate: Callable[[], dict[str, float]] | None = None,
) -> TrainResult:
    """Run optimizer steps from ``state.step`` to ``tc.steps``; checkpoint every ``tc.checkpoint_every``.

    Args:
        state: the training state (advanced in place: weights, optimizer, step, samples seen).
        stream: the global batches, positioned at ``state.step``.
        fwd: the wrapped model and the loss (:func:`wrap_model`).
        tc: the ``train`` section (steps, precision, clipping, logging and checkpoint cadence).
        batching: the split of the global batch.
        env: rank, world size and device.
        dirs: where the checkpoints and ``final.pt`` go.
        metrics: events.jsonl + metrics.h5 (``train``, ``preempted`` and ``end`` records).
        save: writes ``state`` as a checkpoint at a path on rank 0 and waits for every rank; returns the path.
        should_stop: polled at every step boundary; True = checkpoint now and return "preempted".
        last_checkpoint: the checkpoint resumed from (named by a non-finite loss message).
        progress: tqdm bar (default: when stderr is a TTY, rank 0 only).
        stop_at: end at this step (below ``tc.steps``) with a checkpoint and status "stopped": the schedule stays
            the one over ``tc.steps``, so a later call resumes the same trajectory (a search round, issue #17).
        validate: every ``tc.val_every`` steps, the held-out metrics merged into that step's record.

    Raises:
        NonFiniteLossError: NaN/inf loss (names the step and the last good checkpoint).
        TrainingOOMError: out of memory (names the batch size to lower).
    """
    optimizer = state.optimizer
    assert optimizer is not None, "train_steps needs a training state (TrainState.build)"
    use_bar = (sys.stderr.isatty() if progress is None else progress) and env.is_main
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=state.step, desc=f"stage {state.stage}", unit="step", dynamic_ncols=True)
    target_mix = {str(s): round(w, 4) for s, w in stream.mix.items()}
    t_last, samples_last = time.time(), state.samples_seen
    state.model.train()
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    try:
        while state.step < end:
            stream.begin_step(state.step)
            if _stop_requested(should_stop, env):
                last_checkpoint = save(dirs.checkpoints / checkpoint_name(state.step))
                metrics.event("preempted", step=state.step, checkpoint=str(last_checkpoint))
                logger.warning("stop requested: checkpointed step %d to %s", state.step, last_checkpoint)
                return TrainResult("preempted", state.step, dirs.path, None, last_checkpoint)
            try:
                loss_val = _forward_backward(fwd, stream, tc.precision, env, batching.grad_accum)
                if not math.isfinite(loss_val):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_val}) at step {state.step + 1} of stage {state.stage}; last good "
                        f"checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}. Lower train.lr (now "
                        f"{tc.lr:g}), keep train.grad_clip > 0, or resume from that checkpoint with --resume PATH"
                    )
                grad_norm = _apply_update(state, tc.grad_clip)
            except Exception as exc:
                if _is_oom(exc):
                    raise TrainingOOMError(_oom_message(state.step, tc, env, batching)) from exc
                raise
            state.step += 1
            state.samples_seen += batching.global_batch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if state.step % tc.log_every == 0 or state.step == tc.steps:
                now = time.time()
                rate = (state.samples_seen - samples_last) / max(now - t_last, 1e-9)
                t_last, samples_last = now, state.samples_seen
                record = {
                    "step": state.step,
                    "samples": state.samples_seen,
                    "loss": loss_val,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": rate,
                    "grad_norm": grad_norm,
                    "logit_scale": state.model.logit_scale.exp().item(),
                    "memory_mb": _memory_mb(env.device),
                    "stage_mix": stream.take_mix(),
                    "stage_mix_target": target_mix,
                }
                if validate is not None and tc.val_every and state.step % tc.val_every == 0:
                    record.update(validate())
                metrics.step(**record)
                if bar is None:
                    _log_record(state, tc, record)
            if state.step % tc.checkpoint_every == 0 and state.step < tc.steps:
                last_checkpoint = save(dirs.checkpoints / checkpoint_name(state.step))
                if env.is_main:
                    for gone in prune_checkpoints(dirs.checkpoints, tc.keep_checkpoints):
                        logger.debug("pruned %s", gone)
        if end < tc.steps:
            if last_checkpoint is None or last_checkpoint.name != checkpoint_name(state.step):
                last_checkpoint = save(dirs.checkpoints / checkpoint_name(state.step))
                if env.is_main:
                    prune_checkpoints(dirs.checkpoints, tc.keep_checkpoints)
            metrics.event("stopped", step=state.step, samples=state.samples_seen, checkpoint=str(last_checkpoint))
            logger.info("stage %d: stopped at step %d of %d -> %s", state.stage, state.step, tc.steps, last_checkpoint)
            return TrainResult("stopped", state.step, dirs.path, None, last_checkpoint)
        save(dirs.final)
        metrics.event("end", step=state.step, samples=state.samples_seen, final=str(dirs.final))
        logger.info(
            "stage %d finished: %d steps, %d samples -> %s", state.stage, state.step, state.samples_seen, dirs.final
        )
        return TrainResult("completed", state.step, dirs.path, dirs.final, dirs.final)
    finally:
        if bar is not None:
            bar.close()
