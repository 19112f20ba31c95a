"""``python -m jobs oracle``: train every candidate of a stage fully, to grade its search (issue #15) — R13.

The work is ``jobs.engine.oracle``. This submits one array task per finished search candidate
(:class:`OracleJob`, requeued on SIGUSR2 like a search task: the training checkpoints at the next step
boundary and resumes) and a summary job (:class:`OracleSummaryJob`, ``afterany`` the array: it lists
candidates that did not finish) that writes ``stage_NN/oracle/summary.json``. ``--executor slurm``
returns at once (``--wait`` waits); ``local``/``debug`` run in this process's time and print the table.
Re-running skips finished candidates; oracle jobs of the stage still queued are not submitted twice.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

import submitit

from data_tools.cli_errors import EXIT_FAILED, EXIT_USAGE, fail
from jobs.cluster import Cluster, get_cluster, make_executor, record_jobs
from jobs.config import ConfigError, RunCfg, check_stage, load_cfg
from jobs.engine.dist import init_distributed
from jobs.engine.oracle import (
    OracleError,
    format_oracle,
    oracle_plan,
    run_oracle_candidate,
    summarize_oracle,
)
from jobs.engine.rundir import RunDir, check_run_dir, read_json
from jobs.logs import setup_logging
from jobs.train import StopFlag

__all__ = ["OracleJob", "OracleSummaryJob", "cmd_fidelity", "cmd_oracle"]


class OracleJob(submitit.helpers.Checkpointable):
    """One array task: ``OracleJob(config, overrides, stage, run_dir)(index)``; only paths travel."""

    def __init__(self, config: str, overrides: tuple[str, ...], stage: int, run_dir: str) -> None:
        self.config, self.overrides, self.stage, self.run_dir = config, tuple(overrides), stage, run_dir

    def __call__(self, index: int) -> dict[str, Any]:
        setup_logging()
        cfg = load_cfg(Path(self.config), self.overrides)
        stop = StopFlag()
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler (SLURM)
        signal.signal(signal.SIGUSR2, stop.set)
        try:
            out = run_oracle_candidate(cfg, self.stage, index, Path(self.run_dir), init_distributed(), stop.is_set)
        finally:
            if requeue is not None:
                signal.signal(signal.SIGUSR2, requeue)
        if out["status"] == "preempted":
            if not callable(requeue):
                raise RuntimeError(
                    f"stage {self.stage} oracle task {index} was preempted at step {out['step']} outside a SLURM "
                    "job; its checkpoint is kept: run the oracle again to resume it"
                )
            requeue(stop.signum or signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
        return out

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same task; it resumes its training from the newest verified checkpoint."""
        return submitit.helpers.DelayedSubmission(OracleJob(self.config, self.overrides, self.stage, self.run_dir))


class OracleSummaryJob(submitit.helpers.Checkpointable):
    """Write ``stage_NN/oracle/summary.json`` (kendall tau, regret) from the finished tasks."""

    def __init__(self, stage: int, run_dir: str) -> None:
        self.stage, self.run_dir = stage, run_dir

    def __call__(self) -> dict[str, Any]:
        setup_logging()
        return summarize_oracle(Path(self.run_dir), self.stage)


def _submit_queued(cfg: RunCfg, run_dir: Path, stage: int, job: OracleJob, count: int, cluster: Cluster) -> list[str]:
    """The array and its summary (``afterany`` the array); nothing when the stage's oracle is still queued."""
    if cluster.active(run_dir).get((stage, "oracle")):
        return []
    folder = RunDir(run_dir).submitit
    jobs = make_executor(cfg.cluster, folder, cluster.kind, "oracle", run=cfg.name).map_array(job, list(range(count)))
    after = cluster.dependency("afterany", [j.job_id for j in jobs])
    summary = make_executor(cfg.cluster, folder, cluster.kind, "oracle-summary", run=cfg.name, after=after)
    sjob = summary.submit(OracleSummaryJob(stage, str(run_dir)))
    now, kind = time.time(), cluster.kind
    record_jobs(
        run_dir,
        [{"stage": stage, "step": "oracle", "job_id": j.job_id, "executor": kind, "time": now} for j in jobs]
        + [{"stage": stage, "step": "oracle-summary", "job_id": sjob.job_id, "executor": kind, "time": now}],
    )
    return [j.job_id for j in jobs] + [sjob.job_id]


def cmd_oracle(args: argparse.Namespace) -> int:
    """Submit (slurm) or run (local/debug) the oracle of ``--stage``; print its table when it is done."""
    setup_logging()
    run_dir = Path(args.run_dir).resolve()
    try:
        if not RunDir(run_dir).config_yaml.is_file():
            raise ConfigError(f"{RunDir(run_dir).config_yaml} does not exist: --run-dir must be a submitted run")
        cfg = load_cfg(RunDir(run_dir).config_yaml, args.overrides)
        check_stage(cfg, args.stage, first=2)
        check_run_dir(run_dir, cfg)  # --set may change launch settings only: the oracle trains as the run did
        plan = oracle_plan(run_dir, args.stage)
    except (ConfigError, OracleError) as exc:
        return fail(exc, EXIT_USAGE)
    cluster = get_cluster(args.executor or cfg.cluster.executor)
    # an EMA shadow only measures (its decay never changes the trained weights): not a config of the run's
    ema = (f"train.ema_decay={args.ema}",) if getattr(args, "ema", None) else ()
    job = OracleJob(str(RunDir(run_dir).config_yaml), (*args.overrides, *ema), args.stage, str(run_dir))
    todo = [
        k
        for k, c in enumerate(plan)
        if read_json(RunDir(run_dir).stage(args.stage).oracle.cand(c["index"]).result_json) is None
    ]
    if cluster.queues and todo:
        ids = _submit_queued(cfg, run_dir, args.stage, job, len(plan), cluster)
        print(f"stage {args.stage} oracle: " + (f"submitted {' '.join(ids)}" if ids else "already queued"))
        if not args.wait:
            return 0
        while (active := cluster.active(run_dir)).get((args.stage, "oracle")) or active.get(
            (args.stage, "oracle-summary")
        ):
            time.sleep(5)
    elif todo:
        ex = make_executor(cfg.cluster, RunDir(run_dir).submitit, cluster.kind, "oracle", run=cfg.name)
        failed = 0
        for k in todo:
            try:
                ex.submit(job, k).result()
            except Exception as exc:  # the others still run; the summary lists it as missing
                failed += 1
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                print(f"stage {args.stage} oracle candidate {plan[k]['name']} failed: {last}", flush=True)
        if failed:
            summarize_oracle(run_dir, args.stage)
            return fail(
                f"{failed} of {len(plan)} oracle candidates failed ({RunDir(run_dir).stage(args.stage).oracle.path}); "
                "see their failed.json, then run the oracle again to redo only those",
                EXIT_FAILED,
            )
    summary = summarize_oracle(run_dir, args.stage)
    odir = RunDir(run_dir).stage(args.stage).oracle.path
    print(format_oracle(summary))
    return (
        0
        if not summary["missing"]
        else fail(
            f"{len(summary['missing'])} oracle candidates have no result ({odir}); run the "
            "oracle again to redo only those",
            EXIT_FAILED,
        )
    )


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Grade the search estimators on the oracle's learning curves of ``--stage``; write oracle/fidelity.json."""
    from data_tools.atomic import atomic_write_json
    from jobs.engine.fidelity import fidelity_report, format_fidelity

    run_dir = Path(args.run_dir).resolve()
    try:
        cfg = load_cfg(RunDir(run_dir).config_yaml)
        check_stage(cfg, args.stage, first=2)
        budgets = [int(b) for b in args.budgets.split(",")]
        schedules = []
        for text in args.halving:
            steps, keep, rounds = text.split(",")
            schedules.append((int(steps), float(keep), int(rounds)))
        rep = fidelity_report(run_dir, args.stage, cfg.train.steps, budgets, schedules)
    except (ConfigError, FileNotFoundError) as exc:
        return fail(exc, EXIT_USAGE)
    except ValueError as exc:
        return fail(f"--budgets/--halving: {exc} (e.g. --budgets 20,50,100 --halving 50,0.5,3)", EXIT_USAGE)
    atomic_write_json(RunDir(run_dir).stage(args.stage).oracle.path / "fidelity.json", rep)
    print(format_fidelity(rep))
    return 0
