"""``python -m jobs train``: train one stage in this process (single, torchrun, or srun tasks) — R13 thin job.

The wiring is ``jobs.engine.trainer`` (its loop: ``jobs.engine.loop``); this file parses, sets up logging
and the process group, turns SIGUSR2 (SLURM's preemption/timeout warning, ``sbatch --signal=USR2@90``)
into a checkpoint at the next step boundary, and maps failures to exit codes: 0 done, 1 failed (message
names the fix), 2 bad input, 3 preempted (checkpointed; re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from data_tools.cli_errors import fail
from jobs.config import ConfigError, check_stage, load_cfg
from jobs.engine.checkpoint import CheckpointError
from jobs.engine.dist import cleanup_distributed, init_distributed, world_info_from_env
from jobs.engine.metrics import MetricsWriteError
from jobs.engine.trainer import NonFiniteLossError, TrainingOOMError, UsageError, train_stage
from jobs.logs import setup_logging

__all__ = ["StopFlag", "cmd_train", "EXIT_PREEMPTED"]

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 3


class StopFlag:
    """Set by a signal handler, polled by the training loop at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int, frame: object = None) -> None:
        self.signum = signum
        logger.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)

    def is_set(self) -> bool:
        return self.signum is not None


def cmd_train(args: argparse.Namespace) -> int:
    """Train ``--stage`` of ``--config`` into ``--run-dir`` and evaluate the result."""
    setup_logging(world_info_from_env()[0])
    try:
        cfg = load_cfg(args.config, args.overrides)
        check_stage(cfg, args.stage)
    except ConfigError as exc:
        return fail(exc, 2)
    stop = StopFlag()
    signal.signal(signal.SIGUSR2, stop.set)
    env = init_distributed()
    try:
        result = train_stage(
            cfg,
            args.stage,
            Path(args.run_dir),
            env,
            init=args.init,
            resume=args.resume,
            should_stop=stop.is_set,
            evaluate=not args.no_eval,
        )
    except (UsageError, ConfigError, FileNotFoundError) as exc:
        return fail(exc, 2)
    except (NonFiniteLossError, TrainingOOMError, CheckpointError, MetricsWriteError) as exc:
        return fail(exc, 1)
    finally:
        cleanup_distributed()
    if result.status == "preempted":
        print(
            f"preempted at step {result.step}: checkpoint {result.last_checkpoint}; re-run to resume", file=sys.stderr
        )
        return EXIT_PREEMPTED
    if env.is_main:
        print(result.final)
    return 0
