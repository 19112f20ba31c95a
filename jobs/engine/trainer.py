"""The training loop of one growth stage (DESIGN.md step 3: train the selected model fully on D_<=t).

``run_training`` is plain Python: the same function runs single-process, under torchrun and inside
a submitit task (the Checkpointable in ``jobs/submit_train.py`` only adds the requeue). It never
imports submitit; preemption reaches it through ``should_stop``, a callable checked at every step
boundary (all ranks agree through an all-reduce), upon which it writes a checkpoint and returns
``status="preempted"``.

Per optimizer step: ``grad_accum`` micro-batches (DDP ``no_sync`` on all but the last), symmetric
InfoNCE over the global batch (features all-gathered; the loss is scaled by the world size before
backward so that DDP's gradient *average* equals the single-process gradient of the same global
batch), grad clipping, AdamW/LAMB step, cosine schedule with linear warmup, optional EMA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data_tools.atomic import atomic_write_json, atomic_write_text
from jobs.config import RunCfg, TrainCfg, dump_cfg
from jobs.engine.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    checkpoint_name,
    find_resume,
    interrupted_first_save,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from jobs.engine.data import BatchStream, DataPosition, check_corpus
from jobs.engine.dist import DistEnv
from jobs.engine.evaluate import evaluate_stage
from jobs.engine.metrics import MetricsLog
from jobs.engine.rundir import check_run_dir
from model.spec import ArchSpec
from model.structs import to_dict

__all__ = [
    "TrainResult",
    "NonFiniteLossError",
    "TrainingOOMError",
    "UsageError",
    "stage_dir",
    "lr_factor",
    "run_training",
    "train_stage",
]

logger = logging.getLogger(__name__)

ResumeMode = str  # "latest", "none", or a checkpoint path


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingOOMError(RuntimeError):
    """Out of memory; the message names the batch size to lower."""


class UsageError(ValueError):
    """Bad input to a training (incompatible resume/init, batch sizes, tokenizer): exit code 2."""


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`run_training` ended with."""

    status: Literal["completed", "preempted", "already_done"]
    step: int  # optimizer steps done
    train_dir: Path
    final: Path | None  # final.pt when completed
    last_checkpoint: Path | None


def stage_dir(run_dir: Path, stage: int) -> Path:
    """RUN_DIR/stage_NN."""
    return Path(run_dir) / f"stage_{stage:02d}"


def lr_factor(step: int, cfg: TrainCfg) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _uses_bf16(precision: str, device: torch.device) -> bool:
    """train.precision: bf16, or auto on CUDA, means bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if _uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@dataclass
class _Batching:
    """Global batch B = world W x streams-per-rank x per-stream micro-batch x grad_accum A."""

    global_batch: int
    grad_accum: int
    streams: int
    per_stream: int
    per_rank_micro: int


def _batching(cfg: TrainCfg, env: DistEnv) -> _Batching:
    streams = cfg.data_streams or env.world_size
    if streams % env.world_size:
        raise UsageError(
            f"train.data_streams={streams} must be a multiple of the world size {env.world_size}; "
            f"set train.data_streams to a multiple of {env.world_size} (or 0 = one per rank)"
        )
    denom = cfg.grad_accum * streams
    if cfg.batch_size % denom:
        raise UsageError(
            f"train.batch_size={cfg.batch_size} must be divisible by grad_accum x streams = {cfg.grad_accum} x "
            f"{streams} = {denom}; pick a multiple of {denom}"
        )
    per_stream = cfg.batch_size // denom
    return _Batching(cfg.batch_size, cfg.grad_accum, streams, per_stream, per_stream * streams // env.world_size)


def _check_optimizer_state(payload: dict[str, Any], path: Path | None, optimizer: Any, tc: TrainCfg) -> None:
    """Refuse a checkpoint whose optimizer state does not fit ``optimizer``: another ``train.optimizer`` (its
    hyper-parameter keys differ: torch would load it and fail at the first step, e.g. ``KeyError:
    'bias_correction'``) or other parameter groups. Keys a torch version adds to the same optimizer are fine."""
    old_kind = ((payload.get("config") or {}).get("train") or {}).get("optimizer", tc.optimizer)
    groups = (payload.get("optimizer") or {}).get("param_groups", [])
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if old_kind == tc.optimizer and [len(g.get("params", ())) for g in groups] == sizes:
        return
    what = (
        f"train.optimizer: {old_kind!r} -> {tc.optimizer!r}"
        if old_kind != tc.optimizer
        else f"its parameter groups hold {[len(g.get('params', ())) for g in groups]} tensors, this model's {sizes}"
    )
    raise UsageError(
        f"the optimizer state of the checkpoint does not fit this config: {what} ({path}); resume with the "
        "config it was written with, or start a fresh training in another --run-dir (--init CKPT keeps its weights)"
    )


class _Ema:
    """Exponential moving average of the weights: ema = d·ema + (1-d)·θ after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)


def _forward_backward(
    ddp: nn.Module,
    stream: BatchStream,
    loss_fn: nn.Module,
    precision: str,
    env: DistEnv,
    accum: int,
    forward: Callable[..., Any] | None = None,
) -> float:
    """Forward + backward of ``accum`` micro-batches (DDP syncs on the last); returns the mean loss.

    ``forward`` is what is called (the compiled ``ddp`` when compiling; default ``ddp``);
    ``ddp`` itself provides ``no_sync``.
    """
    forward = ddp if forward is None else forward
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(accum):
        images, tokens = stream.next()
        images, tokens = images.to(env.device, non_blocking=True), tokens.to(env.device, non_blocking=True)
        sync = micro == accum - 1 or not env.distributed
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with _autocast(precision, env.device):
                img, txt, scale = forward(images, tokens)
                loss = loss_fn(img.float(), txt.float(), scale.float())
            # x world_size: DDP averages gradients, but with gathered features each rank's backward
            # yields only its share of the global loss's gradient (jobs/README.md)
            (loss * env.world_size / accum).backward()
        loss_sum += loss.detach()
    return (loss_sum / accum).item()


def _apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: _Ema | None,
    grad_clip: float,
) -> float:
    """Clip, step optimizer and schedule, update the EMA; returns the grad norm before clipping."""
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return grad_norm


def _oom_message(step: int, tc: TrainCfg, env: DistEnv, batching: _Batching) -> str:
    b = tc.batch_size
    return (
        f"out of memory at step {step + 1} with a per-rank micro-batch of {batching.per_rank_micro} "
        f"(train.batch_size={b} over {env.world_size} ranks x grad_accum {tc.grad_accum}): lower "
        f"train.batch_size (e.g. --set train.batch_size={max(b // 2, 1)}), raise train.grad_accum "
        f"(e.g. {tc.grad_accum * 2}) or set train.grad_checkpointing=true"
    )


def _resolve_start(
    ckpt_dir: Path, resume: ResumeMode, init: Path | None
) -> tuple[dict[str, Any] | None, Path | None, dict[str, Any] | None]:
    """(resume payload, its path, init payload). A resumable checkpoint wins over --init."""
    payload, path = None, None
    if resume == "latest":
        found = find_resume(ckpt_dir)
        torn = interrupted_first_save(ckpt_dir) if found is None else None
        if torn is not None:
            logger.warning(
                "%s has no checksum file: the first save of this stage was interrupted before it was verified; "
                "starting from scratch (that file is overwritten at its step)",
                torn,
            )
        elif found is None and list_checkpoints(ckpt_dir):
            raise CheckpointError(
                f"every checkpoint in {ckpt_dir} is unusable (see the warnings above); move them away to start "
                "over, or pass --resume PATH"
            )
        if found is not None:
            path, payload = found
    elif resume == "none":
        if list_checkpoints(ckpt_dir):
            raise UsageError(
                f"{ckpt_dir} already holds checkpoints; use --resume latest to continue, or another --run-dir"
            )
    else:
        path = Path(resume)
        payload = load_checkpoint(path)
    init_payload = None
    if init is not None:
        if payload is not None:
            logger.info("resuming from %s: --init %s is ignored (it only seeds a fresh start)", path, init)
        else:
            init_payload = load_checkpoint(Path(init))
    return payload, path, init_payload


def run_training(
    cfg: RunCfg,
    stage: int,
    run_dir: Path,
    env: DistEnv,
    *,
    init: Path | None = None,
    resume: ResumeMode = "latest",
    should_stop: Callable[[], bool] = lambda: False,
    progress: bool | None = None,
) -> TrainResult:
    """Train the stage's model for ``cfg.train.steps`` steps, resuming from the run dir if possible.

    Args:
        cfg: the resolved run config (every section is saved into the checkpoints).
        stage: growth stage t; the data mixture is stages 1..t.
        run_dir: RUN_DIR; this writes RUN_DIR/stage_NN/train/.
        env: rank, world size and device (:func:`jobs.engine.dist.init_distributed`).
        init: a checkpoint whose weights, ArchSpec and growth history start a fresh training
            (e.g. the grown model of a growth step). Ignored when resuming.
        resume: ``"latest"`` (newest usable checkpoint, else a fresh start), ``"none"`` (fresh start;
            refuses when checkpoints exist) or the path of a checkpoint.
        should_stop: polled at every step boundary; True = checkpoint now and return "preempted".
        progress: tqdm bar (default: when stderr is a TTY, rank 0 only).

    Returns:
        :class:`TrainResult`.

    Raises:
        NonFiniteLossError: NaN/inf loss (names the step and the last good checkpoint).
        TrainingOOMError: out of memory (names the batch size to lower).
        UsageError: inconsistent input (batch divisibility, tokenizer vs vocab, resume conflicts).
        CheckpointError: an explicitly named checkpoint (resume path, init) is unusable.
    """
    from model.clip import build_model
    from model.kernels import compile_enabled, kernel_report, make_optimizer, maybe_compile, param_groups
    from model.loss import ClipLoss

    tc = cfg.train
    train_dir = stage_dir(run_dir, stage) / "train"
    ckpt_dir = train_dir / "checkpoints"
    final_path = train_dir / "final.pt"
    metrics = MetricsLog(train_dir, enabled=env.is_main)

    if resume == "latest" and final_path.exists():
        try:
            done = load_checkpoint(final_path)
            logger.info("stage %d already trained: %s (step %d)", stage, final_path, done["step"])
            return TrainResult("already_done", int(done["step"]), train_dir, final_path, final_path)
        except CheckpointError as exc:
            logger.warning("final checkpoint unusable, resuming from the step checkpoints: %s", exc)

    payload, resume_path, init_payload = _resolve_start(ckpt_dir, resume, init)
    source = payload or init_payload
    spec = ArchSpec.from_dict(source["spec"]) if source is not None else cfg.model
    growth_history = list(source.get("growth_history", [])) if source is not None else []
    check_corpus(cfg.data.root, stage, spec.text.vocab_size)
    batching = _batching(tc, env)

    # train.compile: auto = torch.compile on CUDA only (1.3x on the H100 ViT-B/16 step, 0.97x on CPU)
    compiled = compile_enabled(env.device, tc.compile)
    bf16 = _uses_bf16(tc.precision, env.device)
    kernels = {
        **kernel_report(env.device),
        "compile": f"{'torch.compile' if compiled else 'off'} ({tc.compile})",
        "residual": "bfloat16" if bf16 and tc.bf16_residual else "float32",
    }
    logger.info("kernels: %s", kernels)
    logger.info(
        "stage %d: params %.2fM, %.3f GFLOPs/sample, global batch %d = %d ranks x %d x accum %d, %d data streams",
        stage,
        spec.params() / 1e6,
        spec.flops_per_sample() / 1e9,
        batching.global_batch,
        env.world_size,
        batching.per_rank_micro,
        batching.grad_accum,
        batching.streams,
    )

    _seed_everything(tc.seed)
    model = build_model(spec, seed=tc.seed)
    if init_payload is not None:
        model.load_state_dict(init_payload["model"], strict=True)
        logger.info(
            "initialised from %s (step %s, stage %s)", init, init_payload.get("step"), init_payload.get("stage")
        )
    model.set_grad_checkpointing(tc.grad_checkpointing)
    model.low_precision_residual = tc.bf16_residual  # only acts under autocast
    model.to(env.device)
    optimizer = make_optimizer(
        param_groups(model, tc.weight_decay), tc.optimizer, tc.lr, tuple(tc.betas), tc.eps, tc.weight_decay, env.device
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)  # bf16/fp32 need no loss scaling
    ema = _Ema(model, tc.ema_decay) if tc.ema_decay > 0 else None

    step, samples = 0, 0
    position = DataPosition()
    if payload is not None:
        model.load_state_dict(payload["model"], strict=True)
        _check_optimizer_state(payload, resume_path, optimizer, tc)
    if env.is_main:  # every check has passed: the stage's config now claims the run dir (jobs/engine/rundir.py)
        train_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(train_dir / "config.yaml", dump_cfg(cfg))
        atomic_write_json(train_dir / "spec.json", spec.to_dict())
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        if ema is not None and payload.get("ema") is not None:
            ema.state = {k: v.float() for k, v in payload["ema"].items()}
        _set_rng_state(payload["rng"])
        step, samples = int(payload["step"]), int(payload["samples_seen"])
        data_state = payload["data"]
        if data_state["streams"] != batching.streams or data_state["per_stream"] != batching.per_stream:
            logger.warning(
                "data layout changed since the checkpoint (streams %s->%d, per-stream batch %s->%d): the data "
                "order will differ from an uninterrupted run",
                data_state["streams"],
                batching.streams,
                data_state["per_stream"],
                batching.per_stream,
            )
        else:
            position = DataPosition(int(data_state["segment_start"]), int(data_state["offset"]))
        metrics.truncate_after(step)
        metrics.event("resume", step=step, checkpoint=str(resume_path), world_size=env.world_size)
        logger.info("resumed from %s at step %d (%d samples seen)", resume_path, step, samples)
    else:
        metrics.truncate_after(0)
        metrics.event(
            "start",
            stage=stage,
            steps=tc.steps,
            world_size=env.world_size,
            spec=spec.to_dict(),
            init=str(init) if init else None,
            params=spec.params(),
            kernels=kernels,
        )

    ddp: nn.Module = model
    if env.distributed:
        ddp = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    # Only the forward goes through the compiled wrapper (DDP first, then compile: DDPOptimizer splits the
    # graph at the gradient buckets). Everything else (checkpoints, EMA, clipping, logging, growth) keeps
    # using ``model``, whose state-dict keys the compiled wrapper would prefix with ``_orig_mod.``.
    forward = maybe_compile(ddp, env.device, tc.compile)
    loss_fn = ClipLoss(rank=env.rank, world_size=env.world_size)
    stream = BatchStream(
        cfg.data,
        stage,
        per_stream_batch=batching.per_stream,
        streams=batching.streams,
        rank=env.rank,
        world_size=env.world_size,
        image_size=spec.image.image_size,
        context_length=spec.text.context_length,
        segment_every=tc.checkpoint_every,
        position=position,
    )

    last_ckpt: Path | None = resume_path

    def save(path: Path) -> Path:
        if env.is_main:
            body = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "samples_seen": samples,
                "stage": stage,
                "spec": spec.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state if ema is not None else None,
                "rng": _rng_state(),
                "data": {**stream.position.to_dict(), "streams": batching.streams, "per_stream": batching.per_stream},
                "growth_history": growth_history,
                "config": to_dict(cfg),
                "init": str(init) if init else None,
                "world_size": env.world_size,
                "torch_version": str(torch.__version__),
            }
            digest = save_checkpoint(body, path)
            metrics.event("checkpoint", step=step, path=str(path), sha256=digest)
            logger.info("checkpoint step %d -> %s", step, path)
        if env.distributed:
            dist.barrier()
        return path

    def stop_requested() -> bool:
        flag = bool(should_stop())
        if env.distributed:
            t = torch.tensor([int(flag)], device=env.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    use_bar = (sys.stderr.isatty() if progress is None else progress) and env.is_main
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"stage {stage}", unit="step", dynamic_ncols=True)
    target_mix = {str(s): round(w, 4) for s, w in stream.mix.items()}
    t_last, samples_last = time.time(), samples
    model.train()
    try:
        while step < tc.steps:
            stream.begin_step(step)
            if stop_requested():
                last_ckpt = save(ckpt_dir / checkpoint_name(step))
                metrics.event("preempted", step=step, checkpoint=str(last_ckpt))
                logger.warning("stop requested: checkpointed step %d to %s", step, last_ckpt)
                return TrainResult("preempted", step, train_dir, None, last_ckpt)
            try:
                loss_val = _forward_backward(ddp, stream, loss_fn, tc.precision, env, batching.grad_accum, forward)
                if not math.isfinite(loss_val):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_val}) at step {step + 1} of stage {stage}; last good checkpoint: "
                        f"{last_ckpt or 'none (no checkpoint written yet)'}. Lower train.lr (now {tc.lr:g}), keep "
                        f"train.grad_clip > 0, or resume from that checkpoint with --resume PATH"
                    )
                grad_norm = _apply_update(model, optimizer, scheduler, ema, tc.grad_clip)
            except Exception as exc:
                if _is_oom(exc):
                    raise TrainingOOMError(_oom_message(step, tc, env, batching)) from exc
                raise
            step += 1
            samples += batching.global_batch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.time()
                rate = (samples - samples_last) / max(now - t_last, 1e-9)
                t_last, samples_last = now, samples
                record = {
                    "step": step,
                    "samples": samples,
                    "loss": loss_val,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": rate,
                    "grad_norm": grad_norm,
                    "logit_scale": model.logit_scale.exp().item(),
                    "memory_mb": _memory_mb(env.device),
                    "stage_mix": stream.take_mix(),
                    "stage_mix_target": target_mix,
                }
                metrics.step(**record)
                if bar is None:
                    logger.info(
                        "stage %d step %d/%d loss %.4f lr %.2e grad_norm %.3f logit_scale %.2f %.1f samples/s",
                        stage,
                        step,
                        tc.steps,
                        loss_val,
                        record["lr"],
                        grad_norm,
                        record["logit_scale"],
                        rate,
                    )
            if step % tc.checkpoint_every == 0 and step < tc.steps:
                last_ckpt = save(ckpt_dir / checkpoint_name(step))
                if env.is_main:
                    for gone in prune_checkpoints(ckpt_dir, tc.keep_checkpoints):
                        logger.debug("pruned %s", gone)
        save(final_path)
        metrics.event("end", step=step, samples=samples, final=str(final_path))
        logger.info("stage %d finished: %d steps, %d samples -> %s", stage, step, samples, final_path)
        return TrainResult("completed", step, train_dir, final_path, final_path)
    finally:
        if bar is not None:
            bar.close()
        stream.close()


def train_stage(
    cfg: RunCfg,
    stage: int,
    run_dir: Path,
    env: DistEnv,
    *,
    init: Path | None = None,
    resume: ResumeMode = "latest",
    should_stop: Callable[[], bool] = lambda: False,
    evaluate: bool = True,
) -> TrainResult:
    """:func:`run_training`, then (rank 0, once) evaluate ``final.pt`` into RUN_DIR/stage_NN/eval/metrics.json.

    The run dir must be a new directory or one made with this config
    (:func:`jobs.engine.rundir.check_run_dir` raises ``ConfigError`` otherwise).
    """
    check_run_dir(run_dir, cfg)
    result = run_training(cfg, stage, run_dir, env, init=init, resume=resume, should_stop=should_stop)
    out = stage_dir(run_dir, stage) / "eval" / "metrics.json"
    if evaluate and result.final is not None and env.is_main and not out.exists():
        metrics = evaluate_stage(result.final, cfg, stage, out, env.device)
        MetricsLog(result.train_dir).event("eval", path=str(out), summary=metrics["summary"])
    return result
