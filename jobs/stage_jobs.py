"""Thin jobs of the stage pipeline (R13): ``search-candidate``, ``select``, stage ``evaluate``.

Checkpointables holding only paths and numbers (the candidate index is the array argument): a requeued
task is the same call again and skips or resumes finished work. The CLI verbs (what ``slurm/*.sbatch``
call) run the same engine functions in this process. Training is ``jobs.submit_train.TrainJob``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any

import submitit

from data_tools.cli_errors import fail
from jobs.config import ConfigError, check_stage, load_cfg
from jobs.engine.dist import init_distributed
from jobs.engine.rundir import RunDir, check_run_dir
from jobs.logs import setup_logging
from jobs.train import EXIT_PREEMPTED, StopFlag

__all__ = ["SearchJob", "SelectJob", "EvalJob", "cmd_search_candidate", "cmd_select"]


def _search(
    config: str,
    stage: int,
    run_dir: str,
    index: int,
    stop: StopFlag | None = None,
    on_usr2_scoring: Any = None,
    round: int = 1,
) -> dict[str, Any]:
    """One candidate; with ``stop`` (installed on SIGUSR2) its training checkpoints on the signal, and once the
    training is over SIGUSR2 goes to ``on_usr2_scoring`` instead (requeue at once: nothing left to save)."""
    from jobs.engine.search import run_search_candidate

    cfg = load_cfg(Path(config))
    kw: dict[str, Any] = {}
    if stop is not None:
        kw["should_stop"] = stop.is_set
    if on_usr2_scoring is not None:
        kw["before_scoring"] = lambda: signal.signal(signal.SIGUSR2, on_usr2_scoring)
    return run_search_candidate(cfg, stage, index, Path(run_dir), init_distributed(), round=round, **kw)


def _exit_preempted(signum: int, frame: Any) -> None:
    """SIGUSR2 while a candidate is scored (its final.pt is written): exit 3 now, the requeued task scores."""
    logging.getLogger(__name__).warning("SIGUSR2 while scoring: exiting %d; the requeued task scores", EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)


def _select(config: str, stage: int, run_dir: str, round: int | None = None) -> dict[str, Any]:
    from jobs.engine.select import run_select

    return run_select(load_cfg(Path(config)), stage, Path(run_dir), round)


def _evaluate(config: str, stage: int, run_dir: str) -> dict[str, Any]:
    from jobs.engine.evaluate import evaluate_stage

    cfg, sd = load_cfg(Path(config)), RunDir(run_dir).stage(stage)
    final, out = sd.final, sd.eval_metrics
    return evaluate_stage(final, cfg, stage, out, init_distributed().device)["summary"]


class SearchJob(submitit.helpers.Checkpointable):
    """One array task of search round ``round``: ``SearchJob(config, stage, run_dir, round)(index)``."""

    def __init__(self, config: str, stage: int, run_dir: str, round: int = 1) -> None:
        self.config, self.stage, self.run_dir, self.round = config, stage, run_dir, round

    def __call__(self, index: int) -> dict[str, Any]:
        setup_logging()
        stop = StopFlag()
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        signal.signal(signal.SIGUSR2, stop.set)  # first: a checkpoint at the next step boundary
        try:
            scoring = requeue if callable(requeue) else None
            out = _search(self.config, self.stage, self.run_dir, index, stop, scoring, getattr(self, "round", 1))
        finally:
            if requeue is not None:  # None: installed outside Python, cannot be put back
                signal.signal(signal.SIGUSR2, requeue)
        if out["status"] == "preempted":
            if not callable(requeue):  # not under submitit's SLURM executor: nobody would requeue it
                raise RuntimeError(
                    f"stage {self.stage} candidate {index} was preempted (SIGUSR2) at step {out['step']} outside "
                    "a SLURM job; its checkpoint is kept: resubmit the run to resume it"
                )
            requeue(stop.signum or signal.SIGUSR2, None)  # checkpoint() (this task again) + scontrol requeue + exit
        return out


class SelectJob(submitit.helpers.Checkpointable):
    """Rank search round ``round`` (None: the last) of the stage: round_RR.json, or selected.json at the last."""

    def __init__(self, config: str, stage: int, run_dir: str, round: int | None = None) -> None:
        self.config, self.stage, self.run_dir, self.round = config, stage, run_dir, round

    def __call__(self) -> dict[str, Any]:
        setup_logging()
        return _select(self.config, self.stage, self.run_dir, getattr(self, "round", None))


class EvalJob(submitit.helpers.Checkpointable):
    """Evaluate the stage's final.pt into stage_NN/eval/metrics.json (skipped when it exists)."""

    def __init__(self, config: str, stage: int, run_dir: str) -> None:
        self.config, self.stage, self.run_dir = config, stage, run_dir

    def __call__(self) -> dict[str, Any]:
        setup_logging()
        return _evaluate(self.config, self.stage, self.run_dir)


def _run(fn: Any, *args: Any) -> int:
    setup_logging()
    keep = (
        "status",
        "index",
        "name",
        "step",
        "round",
        "score",
        "val_loss",
        "proxy_acc1",
        "winner",
        "survivors",
        "reason",
    )
    try:
        out = fn(*args)  # one JSON line on stdout: the gist of result.json / selected.json
        print(json.dumps({k: (v["name"] if k == "winner" else v) for k, v in out.items() if k in keep}))
        if out.get("status") == "preempted":
            return EXIT_PREEMPTED  # the sbatch script requeues the task; it resumes from the checkpoint
    except ConfigError as exc:
        return fail(exc, 2)
    except Exception as exc:  # the message names the candidate/stage; the traceback is in failed.json
        return fail(f"{type(exc).__name__}: {exc}", 1)
    return 0


def _stage_args_error(args: argparse.Namespace) -> int | None:
    """Exit code 2 (one error line printed) when --config, --stage or --index cannot name a growth step."""
    try:
        cfg = load_cfg(Path(args.config))
        check_stage(cfg, args.stage, first=2)
        check_run_dir(Path(args.run_dir), cfg)  # results of another config never land in this run
        if getattr(args, "index", 0) < 0:
            raise ConfigError(f"--index {args.index} must be >= 0 (the candidate's array task id)")
    except ConfigError as exc:
        return fail(exc, 2)
    return None


def cmd_search_candidate(args: argparse.Namespace) -> int:
    """Grow, train and score one candidate (``--index``, e.g. $SLURM_ARRAY_TASK_ID)."""
    if (rc := _stage_args_error(args)) is not None:
        return rc
    stop = StopFlag()
    signal.signal(signal.SIGUSR2, stop.set)  # SLURM's warning (sbatch --signal=B:USR2@90): checkpoint, exit 3
    return _run(_search, str(args.config), args.stage, str(args.run_dir), args.index, stop, _exit_preempted, args.round)


def cmd_select(args: argparse.Namespace) -> int:
    """Rank a stage's candidates; write selected.json and selected.pt."""
    if (rc := _stage_args_error(args)) is not None:
        return rc
    return _run(_select, str(args.config), args.stage, str(args.run_dir), args.round)
