"""One growth stage's training, wired from its config (DESIGN.md step 3: train the selected model on D_<=t).

Three layers, as MAE's cluster → wiring → loop: ``jobs/train.py`` and ``jobs/submit_train.py`` (the
jobs: logging, process group, signals, exit codes) call :func:`train_stage` / :func:`run_training`
here (the wiring: config → objects), which drive :func:`jobs.engine.loop.train_steps` (the loop: steps
over a :class:`~jobs.engine.data.BatchStream`, given the narrow pieces it needs).

``run_training`` is plain Python: the same function runs single-process, under torchrun and inside a
submitit task (the Checkpointable in ``jobs/submit_train.py`` only adds the requeue). It never imports
submitit; preemption reaches it through ``should_stop``, a callable checked at every step boundary, upon
which it writes a checkpoint and returns ``status="preempted"``. What it wires: where to start (a
finished ``final.pt``, the newest verified checkpoint, ``--init``), the batch split, the
:class:`~jobs.engine.train_state.TrainState` (whose ``state_dict`` every checkpoint saves), the run
dir's claim (config.yaml, spec.json), the ``start``/``resume`` events, DDP and ``torch.compile``, the
data stream at the saved position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data_tools.atomic import atomic_write_json, atomic_write_text
from jobs.config import RunCfg, TrainCfg, dump_cfg
from jobs.engine.checkpoint import (
    CheckpointError,
    find_resume,
    interrupted_first_save,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from jobs.engine.data import BatchStream, DataPosition, check_corpus, check_tokenizer_text
from jobs.engine.dist import DistEnv
from jobs.engine.evaluate import evaluate_stage
from jobs.engine.loop import (
    Batching,
    NonFiniteLossError,
    TrainingOOMError,
    TrainResult,
    train_steps,
    uses_bf16,
    wrap_model,
)
from jobs.engine.metrics import MetricsLog
from jobs.engine.rundir import RunDir, TrainDir, check_run_dir
from jobs.engine.tokens import check_same_tokenizer, keep_run_tokenizer, run_tokenizer_text, text_sha256
from jobs.engine.train_state import TrainState, lr_factor, seed_everything
from model.spec import ArchSpec
from model.structs import to_dict

__all__ = [
    "TrainResult",
    "NonFiniteLossError",
    "TrainingOOMError",
    "UsageError",
    "lr_factor",
    "run_training",
    "train_stage",
]

logger = logging.getLogger(__name__)

ResumeMode = str  # "latest", "none", or a checkpoint path


class UsageError(ValueError):
    """Bad input to a training (incompatible resume/init, batch sizes, tokenizer): exit code 2."""


def _batching(cfg: TrainCfg, env: DistEnv) -> Batching:
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
    return Batching(cfg.batch_size, cfg.grad_accum, streams, per_stream, per_stream * streams // env.world_size)


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


def _already_done(dirs: TrainDir, stage: int) -> TrainResult | None:
    """The stage's verified ``final.pt`` as an ``already_done`` result, else None."""
    if not dirs.final.exists():
        return None
    try:
        done = load_checkpoint(dirs.final)
    except CheckpointError as exc:
        logger.warning("final checkpoint unusable, resuming from the step checkpoints: %s", exc)
        return None
    logger.info("stage %d already trained: %s (step %d)", stage, dirs.final, done["step"])
    return TrainResult("already_done", int(done["step"]), dirs.path, dirs.final, dirs.final)


def _resolve_start(
    ckpt_dir: Path, resume: ResumeMode, init: Path | None, continue_init: bool = False
) -> tuple[dict[str, Any] | None, Path | None, dict[str, Any] | None]:
    """(resume payload, its path, init payload). A resumable checkpoint wins over --init; with ``continue_init`` a
    training state given as ``init`` (a search winner's checkpoint, issue #17) is resumed, not only its weights."""
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
            if continue_init and init_payload.get("optimizer") is not None:
                logger.info("continuing the training state of %s at step %d", init, init_payload["step"])
                return init_payload, Path(init), None
    return payload, path, init_payload


def _kernels(spec: ArchSpec, tc: TrainCfg, env: DistEnv, batching: Batching, stage: int) -> dict[str, str]:
    """Log and return which kernels run (the ``start`` event's ``kernels``), and the model and batch split."""
    from model.kernels import compile_enabled, kernel_report

    # train.compile: auto = torch.compile on CUDA only (1.3x on the H100 ViT-B/16 step, 0.97x on CPU)
    compiled = compile_enabled(env.device, tc.compile)
    bf16 = uses_bf16(tc.precision, env.device)
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
    return kernels


def _data_position(saved: dict[str, int], batching: Batching) -> DataPosition:
    """Where a resumed data stream starts: the saved position, or a segment start if the layout changed."""
    if saved["streams"] == batching.streams and saved["per_stream"] == batching.per_stream:
        return DataPosition(int(saved["segment_start"]), int(saved["offset"]))
    logger.warning(
        "data layout changed since the checkpoint (streams %s->%d, per-stream batch %s->%d): the data "
        "order will differ from an uninterrupted run",
        saved["streams"],
        batching.streams,
        saved["per_stream"],
        batching.per_stream,
    )
    return DataPosition()


@dataclass(frozen=True)
class _Saver:
    """The loop's ``save``: rank 0 writes ``state`` with the stream's position and logs it; every rank waits."""

    state: TrainState
    stream: BatchStream
    env: DistEnv
    metrics: MetricsLog

    def __call__(self, path: Path) -> Path:
        if self.env.is_main:
            s = self.stream
            data = {**s.position.to_dict(), "streams": s.streams, "per_stream": s.per_stream_batch}
            digest = save_checkpoint(self.state.state_dict(data, self.env.world_size), path)
            self.metrics.event("checkpoint", step=self.state.step, path=str(path), sha256=digest)
            logger.info("checkpoint step %d -> %s", self.state.step, path)
        if self.env.distributed:
            dist.barrier()
        return path


def _validator(
    cfg: RunCfg, stage: int, spec: ArchSpec, state: TrainState, env: DistEnv, tokenizer: Path
) -> Callable[[], dict]:
    """Held-out metrics of the training state (``train.val_every``) on the pairs a stage's evaluation scores (the
    first ``eval.heldout_samples``), read once; the RNG states are restored after, so validating never changes the
    trajectory."""
    import random

    import numpy as np
    import torch

    from jobs.engine.evaluate import val_batches, validate_model

    batches: list[Any] = []

    def validate() -> dict[str, float]:
        if not batches:
            ctx = spec.text.context_length
            batches.extend(
                val_batches(
                    cfg, stage, spec.image.image_size, ctx, samples=cfg.eval.heldout_samples, tokenizer=tokenizer
                )
            )
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            out = validate_model(state.model, batches, env.device)
            rec = {k: out[k] for k in ("val_loss", "val_loss_se", "val_loss_refit")}
            if state.ema is not None:
                raw = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
                state.model.load_state_dict({k: v.to(raw[k].dtype) for k, v in state.ema.state.items()})
                rec["val_loss_ema"] = validate_model(state.model, batches, env.device)["val_loss"]
                state.model.load_state_dict(raw)
        finally:
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            state.model.train()
        return rec

    return validate


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
    stop_at: int | None = None,
    continue_init: bool = False,
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
        stop_at: stop at this step with a checkpoint (status "stopped"); the schedule is still the one over
            ``cfg.train.steps``, so a later call continues the same trajectory (a search round).
        continue_init: when ``init`` is a training state (optimizer, schedule, data position), continue it
            instead of starting afresh from its weights (the stage's training of a search winner).

    Returns:
        :class:`TrainResult`.

    Raises:
        NonFiniteLossError: NaN/inf loss (names the step and the last good checkpoint).
        TrainingOOMError: out of memory (names the batch size to lower).
        UsageError: inconsistent input (batch divisibility, tokenizer vs vocab, resume conflicts).
        CheckpointError: an explicitly named checkpoint (resume path, init) is unusable.
    """
    from model.clip import build_model

    tc = cfg.train
    dirs = RunDir(run_dir).stage(stage).train
    metrics = MetricsLog(dirs.path, enabled=env.is_main)
    done = _already_done(dirs, stage) if resume == "latest" else None
    if done is not None:
        return done

    payload, resume_path, init_payload = _resolve_start(dirs.checkpoints, resume, init, continue_init)
    source = payload or init_payload
    spec = ArchSpec.from_dict(source["spec"]) if source is not None else cfg.model
    check_corpus(
        cfg.data.root, stage, spec.text.vocab_size, tokenizer=None,
        image_size=spec.image.image_size, allow_upscale=cfg.data.allow_upscale,
    )  # fmt: skip
    starts = [(p, Path(str(path))) for p, path in ((payload, resume_path), (init_payload, init)) if p is not None]
    hashes = [h for p, _ in starts if (h := p.get("tokenizer_sha256"))]
    tok_text, tok_from = run_tokenizer_text(run_dir, cfg.data.tokenizer, cfg.data.root, hashes)
    check_tokenizer_text(tok_text, tok_from, spec.text.vocab_size, "fix data.tokenizer")
    for start, start_path in starts:
        check_same_tokenizer(start, start_path, tok_from, tok_text)
    batching = _batching(tc, env)
    kernels = _kernels(spec, tc, env, batching, stage)

    seed_everything(tc.seed)
    model = build_model(spec, seed=tc.seed)
    if init_payload is not None:
        model.load_state_dict(init_payload["model"], strict=True)
        logger.info(
            "initialised from %s (step %s, stage %s)", init, init_payload.get("step"), init_payload.get("stage")
        )
    history = list(source.get("growth_history", [])) if source is not None else []
    init_name = str(init) if init else None
    state = TrainState.build(
        spec, model, tc, env.device, stage=stage, config=to_dict(cfg), growth_history=history, init=init_name,
        tokenizer=text_sha256(tok_text),
    )  # fmt: skip
    position = DataPosition()
    if payload is not None:
        _check_optimizer_state(payload, resume_path, state.optimizer, tc)
        state.load_state_dict(payload)
        position = _data_position(payload["data"], batching)
    if env.is_main:  # every check has passed: the stage's config now claims the run dir (jobs/engine/rundir.py)
        dirs.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dirs.config_yaml, dump_cfg(cfg))
        atomic_write_json(dirs.spec_json, spec.to_dict())
    tokenizer = keep_run_tokenizer(run_dir, tok_text, tok_from)  # the run's own copy from now on (every rank)
    continued = payload is not None and init is not None and resume_path == Path(init)
    if payload is not None and not continued:
        metrics.truncate_after(state.step)
        metrics.event("resume", step=state.step, checkpoint=str(resume_path), world_size=env.world_size)
        logger.info("resumed from %s at step %d (%d samples seen)", resume_path, state.step, state.samples_seen)
    else:  # a fresh start, or the first start of a training that continues a search winner's state
        metrics.truncate_after(state.step)
        metrics.event(
            "start",
            stage=stage,
            steps=tc.steps,
            world_size=env.world_size,
            spec=spec.to_dict(),
            init=init_name,
            params=spec.params(),
            kernels=kernels,
            **({"continued_at": state.step, "samples": state.samples_seen} if continued else {}),
        )

    fwd = wrap_model(state.model, env, tc.compile)
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
        tokenizer=tokenizer,
    )
    try:
        save = _Saver(state, stream, env, metrics)
        return train_steps(
            state,
            stream,
            fwd,
            tc,
            batching,
            env,
            dirs,
            metrics,
            save,
            should_stop=should_stop,
            last_checkpoint=resume_path,
            progress=progress,
            stop_at=stop_at,
            validate=_validator(cfg, stage, spec, state, env, tokenizer) if tc.val_every else None,
        )
    finally:
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
    # the stage's selected.pt is taken as it is: a search winner's training state (search.trajectory=train)
    # continues, a grown model starts afresh
    own = init is not None and Path(init).resolve() == RunDir(run_dir).stage(stage).selected_pt.resolve()
    result = run_training(
        cfg, stage, run_dir, env, init=init, resume=resume, should_stop=should_stop, continue_init=own
    )
    out = RunDir(run_dir).stage(stage).eval_metrics
    if evaluate and result.final is not None and env.is_main and not out.exists():
        metrics = evaluate_stage(result.final, cfg, stage, out, env.device)
        MetricsLog(result.train_dir).event("eval", path=str(out), summary=metrics["summary"])
    return result
