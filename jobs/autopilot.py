"""``python -m jobs autopilot``: crawls land, the next stage is ingested, grown, trained and evaluated (issue #20).

What one poll does is ``jobs/autopilot_poll.py``; this module runs polls:

* ``--executor slurm``: a small recurring SLURM job (:class:`AutopilotJob`, CPU only, ``autopilot.time_min``). Each
  poll job first submits its successor, ``--dependency=afterany:<itself> --begin=now+poll_s``, then polls: so the
  chain survives a poll that is killed, runs out of time or fails (no login-node process, no busy waiting, no
  scrontab needed). Preemption with requeue reruns the poll as is (a poll is idempotent). ``--stop`` (or
  ``jobs cancel``) ends the chain; a second ``jobs autopilot`` while a poll job is queued submits nothing.
* ``--executor local|debug``: polls in the foreground, every ``poll_s``, until SIGINT or SIGTERM.

SIGTERM during a poll (``scancel``, preemption) ends it at once (:class:`PollStopped`, the locks released on the way
out), except while jobs are being submitted and recorded, where it is held back until the record is written
(:func:`deferred_stop`). The poll jobs are recorded in RUN_DIR/autopilot/polls.json (the newest
``POLLS_KEPT``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit

from data_tools.atomic import atomic_write_json, atomic_write_text
from data_tools.cli_errors import fail
from jobs.autopilot_poll import Autopilot
from jobs.config import ConfigError, RunCfg, dump_cfg, load_cfg, with_absolute_paths
from jobs.engine.autopilot import Events, load_state, retry_spent_crawls, save_state
from jobs.engine.rundir import RunDir, check_run_dir, read_json
from jobs.runlock import LockError, run_lock

__all__ = ["AutopilotJob", "PollStopped", "cmd_autopilot", "deferred_stop", "poll_jobs", "schedule_poll"]

logger = logging.getLogger(__name__)

PENDING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")  # squeue states of a poll job yet to start
POLLS_KEPT = 20  # poll jobs kept in polls.json (older ones have left the queue long ago)


class PollStopped(BaseException):
    """SIGTERM during a poll: the poll ends at once (a BaseException: no ``except Exception`` swallows it)."""


_DEFER: dict[str, Any] = {"on": False, "signum": None}


def _on_sigterm(signum: int, frame: Any) -> None:
    if _DEFER["on"]:
        _DEFER["signum"] = signum
        return
    raise PollStopped(f"autopilot poll stopped by signal {signum}")


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Hold SIGTERM back for the block (jobs submitted and recorded, or neither); raise it at the end."""
    _DEFER["on"], _DEFER["signum"] = True, None
    try:
        yield
    finally:
        _DEFER["on"] = False
        if _DEFER["signum"] is not None:
            signum, _DEFER["signum"] = _DEFER["signum"], None
            raise PollStopped(f"autopilot poll stopped by signal {signum} (held back while submitting)")


def _poll(cfg: RunCfg, cfg_path: Path, run_dir: Path, executor: str) -> None:
    """One poll under RUN_DIR/lock. A lock whose holder died on this host (a poll killed by SIGKILL) is taken over:
    every poll step is idempotent; a live holder, or another host's, skips this poll (``poll_skipped``)."""
    with run_lock(run_dir, break_lock=True, what="jobs autopilot"):
        Autopilot(cfg, cfg_path, run_dir, executor, no_stop=deferred_stop).poll()


# ------------------------------------------------------------------------------------------------- poll jobs
def poll_jobs(run_dir: Path) -> dict[str, str]:
    """The run's autopilot poll jobs still queued or running: job id -> state."""
    from jobs.cluster import queue_states

    polls = (read_json(RunDir(run_dir).autopilot.polls_json) or {}).get("jobs", [])
    return {j: st for j, (st, _) in queue_states([p["job_id"] for p in polls]).items()}


def _record_poll(run_dir: Path, job_id: str) -> None:
    path = RunDir(run_dir).autopilot.polls_json
    polls = (read_json(path) or {}).get("jobs", [])
    polls.append({"job_id": job_id, "time": time.time()})
    atomic_write_json(path, {"jobs": polls[-POLLS_KEPT:]})


def schedule_poll(cfg: RunCfg, cfg_path: Path, run_dir: Path, *, after: str | None = None) -> str | None:
    """Submit a poll job: at once, or (``after`` a running poll job) ``afterany`` it and ``poll_s`` from now. None
    when another poll job is pending (one running or completing does not count: its successor may be the caller,
    released by ``afterany`` while squeue still lists it), or after ``--stop``."""
    from jobs.cluster import Slurm, make_executor

    ad = RunDir(run_dir).autopilot
    if ad.stop_flag.exists() or [j for j, st in poll_jobs(run_dir).items() if j != after and st in PENDING]:
        return None
    ex = make_executor(cfg.cluster, RunDir(run_dir).submitit, "slurm", "autopilot", run=cfg.name)
    params: dict[str, Any] = {"timeout_min": cfg.autopilot.time_min}
    if after is not None:
        extra = Slurm().parameters(cfg.cluster, Slurm().dependency("afterany", [after]))["slurm_additional_parameters"]
        params["slurm_additional_parameters"] = {**extra, "begin": f"now+{max(1, round(cfg.autopilot.poll_s))}"}
    ex.update_parameters(**params)
    job = ex.submit(AutopilotJob(str(cfg_path), str(run_dir)))
    _record_poll(run_dir, job.job_id)
    return job.job_id


class AutopilotJob(submitit.helpers.Checkpointable):
    """One poll as a SLURM job; its successor is submitted first, so the chain outlives a poll that dies."""

    def __init__(self, config: str, run_dir: str) -> None:
        self.config, self.run_dir = config, run_dir

    def __call__(self) -> str:
        from jobs.logs import setup_logging

        setup_logging()
        run_dir, cfg_path = Path(self.run_dir), Path(self.config)
        events = Events(RunDir(run_dir).autopilot)
        try:
            cfg = load_cfg(cfg_path)
        except ConfigError as exc:  # the run's config was damaged: say so where status shows it, and stop
            events("paused", reason=f"the run's config does not load: {exc}")
            raise
        old = signal.signal(signal.SIGTERM, _on_sigterm)  # submitit would only log it and go on until SIGKILL
        try:
            mine = os.environ.get("SLURM_JOB_ID")
            nxt = self._successor(cfg, cfg_path, run_dir, mine, events) if mine else None
            if RunDir(run_dir).autopilot.stop_flag.exists():  # --stop came after this job was queued: no work
                events("poll_skipped", reason="the autopilot was stopped (--stop)")
                return "stopped"
            try:
                _poll(cfg, cfg_path, run_dir, "slurm")
            except LockError as exc:
                logger.warning("autopilot poll skipped: %s", exc)
                events("poll_skipped", reason=str(exc))
            if mine and nxt is None:  # submitting failed before the poll: try once more, or the chain ends here
                self._successor(cfg, cfg_path, run_dir, mine, events)
        except PollStopped as exc:
            events("poll_stopped", reason=str(exc))
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
        return "polled"

    @staticmethod
    def _successor(cfg: RunCfg, cfg_path: Path, run_dir: Path, mine: str, events: Events) -> str | None:
        """Schedule the next poll (``afterany`` this one); a failed sbatch is logged and returns None."""
        try:
            with deferred_stop():  # the successor submitted and recorded, or neither
                nxt = schedule_poll(cfg, cfg_path, run_dir, after=mine)
        except Exception as exc:  # sbatch refused or timed out (submitit raises its own types): say so, poll anyway
            logger.exception("scheduling the next autopilot poll failed")
            events("poll_schedule_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        logger.info("next autopilot poll: %s", f"job {nxt}" if nxt else "already pending, or stopped")
        return nxt or ""


# ------------------------------------------------------------------------------------------------------- CLI
def _prepare(args: argparse.Namespace) -> tuple[RunCfg, Path, Path, str]:
    """The config (paths absolute, the run's plan length kept), the run dir, its config file and the executor.

    Raises:
        ConfigError: no inbox, ``ingest_args`` that do not parse, shards smaller than the model, another config.
    """
    from data_tools.cli import IngestArgsError, parse_ingest_args

    cfg = with_absolute_paths(load_cfg(args.config, args.overrides))
    ac = cfg.autopilot
    if ac.inbox == Path(""):
        raise ConfigError(
            "autopilot.inbox is not set; set it in the config or --set autopilot.inbox=DIR (where crawls land)"
        )
    if not ac.inbox.is_dir():
        raise ConfigError(f"autopilot.inbox {ac.inbox} is not a directory; create it or fix the path")
    try:
        ingest = parse_ingest_args(["--input", str(ac.inbox), "--data-root", str(cfg.data.root), *ac.ingest_args])
    except IngestArgsError as exc:
        raise ConfigError(f"autopilot.ingest_args: {exc}; fix the option") from None
    size = cfg.model.image.image_size
    if ingest.image_size < size and not cfg.data.allow_upscale:
        raise ConfigError(
            f"autopilot.ingest_args make {ingest.image_size} px shards but model.image.image_size is {size}: every "
            f"stage would be refused; add --image-size {size} to autopilot.ingest_args (or --set "
            "data.allow_upscale=true)"
        )
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    kind = args.executor or cfg.cluster.executor
    cfg = replace(cfg, cluster=replace(cfg.cluster, executor=kind))
    stored = check_run_dir(run_dir, cfg)
    if stored is not None:  # keep the run's plan length (the autopilot raised it); the rest is this config
        cfg = replace(cfg, data=replace(cfg.data, stages=load_cfg(stored).data.stages))
    return cfg, run_dir, RunDir(run_dir).config_yaml, kind


def _stop(run_dir: Path) -> int:
    """``--stop``: no further poll is scheduled and the queued ones are cancelled (no lock: a poll may be running)."""
    from jobs.cluster import get_cluster

    ad = RunDir(run_dir).autopilot
    ad.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ad.stop_flag, f"{time.time()}\n")
    cancelled = get_cluster("slurm").cancel(list(poll_jobs(run_dir)))
    Events(ad)("stopped", jobs=cancelled)
    print(f"autopilot stopped{' (cancelled ' + ' '.join(cancelled) + ')' if cancelled else ''}; a running poll "
          "finishes its work and schedules no other")  # fmt: skip
    return 0


def cmd_autopilot(args: argparse.Namespace) -> int:
    from jobs.logs import setup_logging

    setup_logging()
    try:
        cfg, run_dir, cfg_path, kind = _prepare(args)
        if args.stop:
            return _stop(run_dir)
        queued = poll_jobs(run_dir) if kind == "slurm" else {}
        if queued and not args.resume:
            print(f"the autopilot of {run_dir} is already scheduled (job {' '.join(queued)}); nothing to do")
            return 0
        ad = RunDir(run_dir).autopilot
        with run_lock(run_dir, break_lock=args.break_lock, what="jobs autopilot"):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, dump_cfg(cfg))
            ad.stop_flag.unlink(missing_ok=True)
            state = load_state(ad)
            if args.resume and state.get("paused"):
                Events(ad)("resumed", was=state["paused"])
                state["paused"] = None
                t = state.get("in_flight")
                if t is not None:
                    state["stages"][str(t)]["attempts"] = 0
            if args.resume and (retried := retry_spent_crawls(state)):
                Events(ad)("crawls_retried", ids=retried)
            save_state(ad, state)
        if kind == "slurm":
            if queued:
                print(f"autopilot resumed; its next poll (job {' '.join(queued)}) goes on")
                return 0
            job = schedule_poll(cfg, cfg_path, run_dir)
            print(f"autopilot: poll job {job} submitted; it re-submits itself every {cfg.autopilot.poll_s:g} s")
            return 0
        # in the foreground until SIGINT or SIGTERM (a background job started by a script ignores SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with run_lock(run_dir, break_lock=args.break_lock, what="jobs autopilot"):
            while True:
                Autopilot(cfg, cfg_path, run_dir, kind).poll()
                if args.once:
                    return 0
                time.sleep(cfg.autopilot.poll_s)
    except (ConfigError, LockError, ValueError) as exc:
        return fail(exc, 2)
    except KeyboardInterrupt:
        print("autopilot stopped (interrupted); run the same command to go on")
        return 0
