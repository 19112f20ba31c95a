"""``python -m jobs submit-train``: submit one stage's training through submitit, requeued on preemption (R13).

The executor is ``jobs.cluster.make_executor`` (job kind ``train``, named ``growclip-train``).

:class:`TrainJob` (a ``submitit.helpers.Checkpointable``) calls ``jobs.engine.trainer.train_stage``. On
SIGUSR2 (``scancel --signal=USR2``, or ``cluster.signal_delay_s`` before the time limit) the loop checkpoints at
the next step boundary, then submitit's handler runs :meth:`TrainJob.checkpoint` (the same job again) and ``scontrol
requeue``; the restart resumes from the newest verified checkpoint. Only paths travel in the pickle."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import submitit

from data_tools.atomic import atomic_write_text
from data_tools.cli_errors import fail
from jobs.cluster import make_executor  # one executor factory for every job (re-exported: tests use this name)
from jobs.config import ConfigError, check_stage, dump_cfg, load_cfg, with_absolute_paths
from jobs.engine.data import check_corpus
from jobs.engine.dist import cleanup_distributed, init_distributed
from jobs.engine.rundir import RunDir, check_run_dir
from jobs.engine.trainer import train_stage
from jobs.logs import setup_logging
from jobs.train import StopFlag

__all__ = ["TrainJob", "make_executor", "cmd_submit_train"]


class TrainJob(submitit.helpers.Checkpointable):
    """Picklable description of one stage training: config path + overrides + stage + run dir."""

    def __init__(self, config: str, overrides: tuple, stage: int, run_dir: str, init: str | None = None, evaluate=True):
        self.config, self.overrides, self.stage, self.run_dir, self.init = config, overrides, stage, run_dir, init
        self.evaluate = evaluate  # False: a separate evaluate job follows (the stage pipeline)

    def __call__(self) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_* for dist.py
        setup_logging(job_env.global_rank)
        cfg = load_cfg(Path(self.config), self.overrides)
        stop = StopFlag()
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        signal.signal(signal.SIGUSR2, stop.set)
        env = init_distributed()
        try:
            kw = {"init": Path(self.init) if self.init else None, "should_stop": stop.is_set, "evaluate": self.evaluate}
            result = train_stage(cfg, self.stage, Path(self.run_dir), env, **kw)
        finally:
            cleanup_distributed()
        if result.status == "preempted" and callable(requeue):
            requeue(stop.signum or signal.SIGUSR2, None)  # rank 0: checkpoint() + scontrol requeue + exit
        return {"status": result.status, "step": result.step, "final": str(result.final) if result.final else None}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Resubmit the same job; it resumes from the newest verified checkpoint in the run dir."""
        return submitit.helpers.DelayedSubmission(TrainJob(**vars(self)))


def cmd_submit_train(args: argparse.Namespace) -> int:
    """Submit the training; print the job id (and wait for the result with ``--wait``)."""
    run_dir = Path(args.run_dir).resolve()
    try:
        cfg = load_cfg(args.config, args.overrides)
        cfg = with_absolute_paths(cfg)  # the job may start elsewhere
        check_stage(cfg, args.stage)
        check_corpus(
            cfg.data.root, args.stage, cfg.model.text.vocab_size, cfg.data.tokenizer,
            image_size=cfg.model.image.image_size, allow_upscale=cfg.data.allow_upscale,
        )  # fmt: skip
        check_run_dir(run_dir, cfg)  # refuse before anything is queued, not in the job
    except ConfigError as exc:
        return fail(exc, 2)
    # the resolved config is frozen in RUN_DIR/config.yaml: a queued or requeued job reads it, never the user's
    # file again (an edit meanwhile would change, or break, a job already submitted)
    atomic_write_text(RunDir(run_dir).config_yaml, dump_cfg(cfg))
    init = str(Path(args.init).resolve()) if args.init else None
    job_fn = TrainJob(str(RunDir(run_dir).config_yaml), (), args.stage, str(run_dir), init)
    job = make_executor(cfg.cluster, RunDir(run_dir).submitit, args.executor).submit(job_fn)
    print(job.job_id, flush=True)
    if args.wait:
        print(job.result())
    return 0
