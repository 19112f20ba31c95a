"""``python -m jobs plan | submit | status | cancel``: the stage pipeline on SLURM, locally or in-process.

Per stage t (DESIGN.md steps 1-3): ``search`` (one array task per candidate, ``map_array``, at most
``cluster.array_parallelism`` at once; t > 1) → ``select`` → ``train`` (``TrainJob``, ``--init`` the
winner's grown weights) → ``evaluate``. Executors (``cluster.executor`` or ``--executor``, ``jobs.cluster``):

* ``slurm`` — everything is submitted at once and chained with SLURM dependencies: search(t)
  ``afterok`` train(t-1); select ``afterany`` the search array (failed candidates are tolerated down
  to ``search.min_successful``; select itself decides); train ``afterok`` select; evaluate ``afterok``
  train; ``--kill-on-invalid-dep=yes`` removes the rest of a chain whose job failed. Job ids go to
  RUN_DIR/jobs.json; the submitter returns at once.
* ``local`` (submitit's LocalExecutor, subprocesses, the embedded default) and ``debug``
  (in-process) run the same callables stage after stage and wait for them.

What is done, and so what to submit, is planned from the run dir (``jobs.engine.pipeline.plan_actions``):
a resubmission submits nothing for finished work, re-uses jobs of this run still queued or running, and
resubmits only what is missing (e.g. a killed array task). This module submits the plan: which callable
per step, in which order, after which jobs. RUN_DIR/lock keeps two submitters off one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json, atomic_write_text
from data_tools.cli_errors import fail
from jobs.cluster import (
    REPO,
    Cluster,
    cancel_jobs,
    get_cluster,
    job_states,
    load_jobs,
    make_executor,
    record_jobs,
    resources,
)
from jobs.cluster import accounting_states as accounting_states  # jobs/report.py (runs) asks the queue through these
from jobs.cluster import queue_states as queue_states
from jobs.config import ConfigError, RunCfg, dump_cfg, load_cfg, with_absolute_paths
from jobs.engine.autopilot import status_lines
from jobs.engine.data import check_corpus
from jobs.engine.oracle import oracle_status
from jobs.engine.pipeline import STEPS, Action, max_candidates, plan_actions, stage_candidates, stage_state
from jobs.engine.rundir import CandidateList, RunDir, check_run_dir, read_json, read_record
from jobs.engine.runs import candidate_state
from jobs.runlock import LockError, lock_holder_alive, run_lock

__all__ = ["cmd_plan", "cmd_submit", "cmd_status", "cmd_cancel", "parse_stages", "plan_actions"]

SBATCH = {
    "search": "search_array.sbatch",
    "select": "stage.sbatch --step select",
    "train": "train.sbatch",
    "evaluate": "evaluate.sbatch",
}


def parse_stages(text: str | None, n: int) -> list[int]:
    """``"2-3"`` / ``"1,3"`` / None (= all) -> sorted stage numbers in 1..n."""
    if not text:
        return list(range(1, n + 1))
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise ConfigError(f"--stages {text!r}: expected e.g. 2-3 or 1,3") from None
        if not 1 <= lo <= hi <= n:
            raise ConfigError(f"--stages {text!r}: stages must be within 1..data.stages={n}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_plan(cfg: RunCfg, run_dir: Path, actions: list[Action], executor: str) -> str:
    lines = [f"run dir {run_dir}  executor {executor}  data {cfg.data.root}"]
    for a in actions:
        res = resources(cfg.cluster, a.step)
        multi = cfg.search.rounds > 1
        deps = ",".join(
            f"{k}:<stage{s}.{d}{f'.round{r}' if multi and d in ('search', 'select') else ''}>" for k, s, d, r in a.after
        )
        if a.status == "done":
            lines.append(f"stage {a.stage} {a.label:<8} done (skipped)")
            continue
        if a.status == "running":
            lines.append(f"stage {a.stage} {a.label:<8} already queued: {' '.join(a.running)}")
            continue
        what = f"array {a.indices} (parallelism {cfg.cluster.array_parallelism})" if a.step == "search" else "job"
        lines.append(
            f"stage {a.stage} {a.label:<8} submit {what} {a.note}".rstrip()
            + f"\n    resources {res}"
            + (f"\n    dependency {deps}" if deps else "")
        )
        arr = f"--array={','.join(map(str, a.indices))}%{cfg.cluster.array_parallelism} " if a.step == "search" else ""
        dep = f"--dependency={deps} " if deps else ""
        rnd = f" RUN_DIR {a.round}" if a.step in ("search", "select") and cfg.search.rounds > 1 else ""
        lines.append(f"    sbatch {arr}{dep}slurm/{SBATCH[a.step]} RUN_DIR/config.yaml {a.stage}{rnd}")
    for t in sorted({a.stage for a in actions if a.stage > 1}):
        if (line := oracle_status(run_dir, t)) is not None:  # grading the search is a separate verb
            lines.append(f"stage {t} {line}")
        found = stage_candidates(cfg, run_dir, t)
        if found is None:
            lines.append(
                f"stage {t} candidates: decided after stage {t - 1} trains (at most {max_candidates(cfg.growth)})"
            )
        else:
            kept, pruned = found
            lines.append(
                f"stage {t} candidates: " + ", ".join(f"{k}:{c.name} x{c.cost_ratio:.2f}" for k, c in enumerate(kept))
            )
            lines += [f"    pruned {p.name}: {p.reason}" for p in pruned]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- submit
def _callable(cfg_path: Path, run_dir: Path, stage: int, step: str, round: int = 1) -> Any:
    from jobs.stage_jobs import EvalJob, SearchJob, SelectJob
    from jobs.submit_train import TrainJob

    c, r = str(cfg_path), str(run_dir)
    if step == "search":
        return SearchJob(c, stage, r, round)
    if step == "select":
        return SelectJob(c, stage, r, round)
    if step == "evaluate":
        return EvalJob(c, stage, r)
    init = str(RunDir(run_dir).stage(stage).selected_pt) if stage > 1 else None
    return TrainJob(c, (), stage, r, init, evaluate=False)


def submit_chained(
    cfg: RunCfg, cfg_path: Path, run_dir: Path, stages: list[int], cluster: Cluster
) -> list[dict[str, Any]]:
    """Submit every missing step of ``stages`` at once, chained by dependencies; returns the new records."""
    actions = plan_actions(cfg, run_dir, stages, cluster.active(run_dir))
    ids: dict[tuple[int, str, int], list[str]] = {}
    new: list[dict[str, Any]] = []
    for a in actions:
        ids[a.key] = list(a.running)
        if a.status != "submit":
            continue
        after = [c for how, s, d, r in a.after for c in cluster.dependency(how, ids.get((s, d, r), []))]
        ex = make_executor(cfg.cluster, RunDir(run_dir).submitit, cluster.kind, a.step, run=cfg.name, after=after)
        fn = _callable(cfg_path, run_dir, a.stage, a.step, a.round)
        jobs = ex.map_array(fn, a.indices) if a.step == "search" else [ex.submit(fn)]
        now = time.time()
        for k, job in enumerate(jobs):
            rec = {"stage": a.stage, "step": a.step, "job_id": job.job_id, "executor": cluster.kind, "time": now}
            if a.step == "search":
                rec["index"] = a.indices[k]
            if a.round > 1:
                rec["round"] = a.round
            new.append(rec)
            ids[a.key].append(job.job_id)
        print(
            f"stage {a.stage} {a.label}: submitted {' '.join(j.job_id for j in jobs)}"
            + (f" after {','.join(after)}" if after else ""),
            flush=True,
        )
        record_jobs(run_dir, new[-len(jobs) :])
    return new


def _next_local(cfg: RunCfg, run_dir: Path, t: int, ran: set[tuple[int, str, int]], first: bool) -> Action | None:
    """The next step of stage ``t`` to run locally, re-planned from the run dir (a later search round's members
    are known only once the round before is ranked); each step runs at most once per submission."""
    todo = None
    for a in plan_actions(cfg, run_dir, [t]):
        if a.status == "done":
            if first:
                print(f"stage {t} {a.label}: done (skipped)", flush=True)
        elif todo is None and a.key not in ran:
            todo = a
    return todo


def run_local(cfg: RunCfg, cfg_path: Path, run_dir: Path, stages: list[int], kind: str) -> int:
    """Run the stages one after the other through the local/debug executor; wait for each step."""
    os.environ["PYTHONPATH"] = (
        f"{REPO}{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(REPO)
    )
    for t in stages:
        ran: set[tuple[int, str, int]] = set()
        while (a := _next_local(cfg, run_dir, t, ran, first=not ran)) is not None:
            ran.add(a.key)
            ex = make_executor(cfg.cluster, RunDir(run_dir).submitit, kind, a.step, run=cfg.name)
            fn = _callable(cfg_path, run_dir, t, a.step, a.round)
            t0 = time.time()
            extra = {"round": a.round} if a.round > 1 else {}
            if a.step == "search":
                failed = 0
                par = cfg.cluster.array_parallelism
                for i in range(0, len(a.indices), par):
                    chunk = a.indices[i : i + par]
                    jobs = ex.map_array(fn, chunk)
                    now = time.time()
                    recs = [
                        {"stage": t, "step": "search", "index": k, "job_id": j.job_id, "executor": kind, "time": now}
                        for k, j in zip(chunk, jobs, strict=True)
                    ]
                    record_jobs(run_dir, [{**rec, **extra} for rec in recs])
                    for k, job in zip(chunk, jobs, strict=True):
                        try:
                            job.result()
                        except Exception as exc:  # tolerated: select enforces search.min_successful
                            failed += 1
                            print(
                                f"stage {t} {a.label} task {k} failed: {str(exc).strip().splitlines()[-1]}",
                                file=sys.stderr,
                            )
                ok, secs = len(a.indices) - failed, time.time() - t0
                print(f"stage {t} {a.label}: {ok}/{len(a.indices)} candidates finished ({secs:.0f} s)", flush=True)
                continue
            job = ex.submit(fn)
            now = time.time()
            record_jobs(
                run_dir, [{"stage": t, "step": a.step, "job_id": job.job_id, "executor": kind, "time": now, **extra}]
            )
            try:
                out = job.result()
            except Exception as exc:
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                return fail(
                    f"stage {t} {a.label} failed: {last} (job {job.job_id}); its log and traceback are in "
                    f"{run_dir / 'submitit' / str(job.job_id)}; fix the cause, then re-run the same submit",
                    1,
                )
            if a.step == "select" and "winner" not in out:  # a round's ranking
                print(f"stage {t} {a.label}: {out['reason']}", flush=True)
            elif a.step == "select":
                print(f"stage {t} select: {out['winner']['name']} — {out['reason']}", flush=True)
                from jobs.engine.select import growth_lines

                for line in growth_lines(t, out["growth"]):
                    print(f"  {line}", flush=True)
            else:
                print(f"stage {t} {a.step}: done ({time.time() - t0:.0f} s)", flush=True)
    return 0


def _prepare(args: argparse.Namespace) -> tuple[RunCfg, Path, Path, list[int], str]:
    """Load + resolve the config, pick the run dir, write/compare RUN_DIR/config.yaml, check the tokenizer."""
    cfg = load_cfg(args.config, args.overrides)
    cfg = with_absolute_paths(cfg)
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    kind = args.executor or cfg.cluster.executor
    cfg = replace(cfg, cluster=replace(cfg.cluster, executor=kind))
    stages = parse_stages(args.stages, cfg.data.stages)
    check_corpus(
        cfg.data.root, cfg.data.stages, cfg.model.text.vocab_size, cfg.data.tokenizer,
        image_size=cfg.model.image.image_size, allow_upscale=cfg.data.allow_upscale,
    )  # fmt: skip
    check_run_dir(run_dir, cfg)  # the run dir's config is this one (launch settings may change)
    return cfg, run_dir, RunDir(run_dir).config_yaml, stages, kind


def cmd_plan(args: argparse.Namespace) -> int:
    """Dry run: what `submit` would do (no job, no file written)."""
    try:
        cfg, run_dir, _, stages, kind = _prepare(args)
        actions = plan_actions(cfg, run_dir, stages, get_cluster(kind).active(run_dir))
    except ConfigError as exc:
        return fail(exc, 2)
    print(format_plan(cfg, run_dir, actions, kind))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit (slurm) or run (local/debug) the plan's missing steps under RUN_DIR/lock."""
    from jobs.logs import setup_logging

    setup_logging()
    try:
        cfg, run_dir, cfg_path, stages, kind = _prepare(args)
        cluster = get_cluster(kind)
        text = dump_cfg(cfg)
        with run_lock(run_dir, break_lock=args.break_lock):
            check_run_dir(run_dir, cfg)  # again under the lock: another submitter may have written it meanwhile
            atomic_write_text(cfg_path, text)
            actions = plan_actions(cfg, run_dir, stages, cluster.active(run_dir))
            atomic_write_json(
                RunDir(run_dir).plan_json,
                {"executor": kind, "stages": stages, "time": time.time(), "actions": [vars(a) for a in actions]},
            )
            if cluster.queues:
                new = submit_chained(cfg, cfg_path, run_dir, stages, cluster)
                print(f"{len(new)} jobs submitted" + ("" if new else " (nothing to do: finished or queued)"))
            else:
                rc = run_local(cfg, cfg_path, run_dir, stages, kind)
        if cluster.queues:
            if not args.wait:
                return 0
            while cluster.active(run_dir):  # the lock is released: status/cancel work meanwhile
                time.sleep(5)
            rc = 0 if all(stage_state(cfg, run_dir, t).evaluated for t in stages) else 1
            if rc:
                fail(f"the run stopped before finishing ({run_dir}); see python -m jobs status {run_dir}", 1)
    except (ConfigError, LockError) as exc:
        return fail(exc, 2)
    if rc == 0:
        from jobs.engine.report import format_report

        print(format_report(run_dir, cfg.data.stages))
    return rc


def _run_dir_cfg(run_dir: Path) -> RunCfg:
    path = RunDir(run_dir).config_yaml
    if not path.exists():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a submitted run")
    return load_cfg(path)


def cmd_status(args: argparse.Namespace) -> int:
    """Each stage's steps (run dir + squeue/sacct), candidates and winner."""
    run_dir = Path(args.run_dir).resolve()
    try:
        cfg = _run_dir_cfg(run_dir)
    except ConfigError as exc:
        return fail(exc, 2)
    recs = load_jobs(run_dir)
    states = job_states(recs)

    def jobs_of(stage: int, steps: tuple[str, ...], rnd: int | None = None) -> str:
        mine = [
            f"{r.job_id}:{s}"
            for r, s in zip(recs, states, strict=True)
            if r.stage == stage and r.step in steps and rnd in (None, r.round)
        ]
        return " ".join(mine[-8:])

    lock = read_json(RunDir(run_dir).lock)
    if lock:
        alive = lock_holder_alive(lock)
        print(f"lock: pid {lock['pid']} on {lock['host']} ({'alive' if alive else 'stale' if alive is False else '?'})")
    autopilot = status_lines(RunDir(run_dir).autopilot)
    if autopilot:
        from jobs.autopilot import poll_jobs

        polls = poll_jobs(run_dir) if cfg.cluster.executor == "slurm" else {}
        print(autopilot[0] + (f" [poll jobs {' '.join(f'{j}:{s}' for j, s in polls.items())}]" if polls else ""))
        for line in autopilot[1:]:
            print(line)
        if cfg.cluster.executor == "slurm" and not polls and not RunDir(run_dir).autopilot.stop_flag.exists():
            print("  WARNING: no poll job is queued: the autopilot is not running; start it with python -m jobs "
                  f"autopilot --config {RunDir(run_dir).config_yaml}")  # fmt: skip
    for t in range(1, cfg.data.stages + 1):
        st = stage_state(cfg, run_dir, t)
        parts = []
        for step in STEPS:
            if t == 1 and step in ("search", "select"):
                continue
            rounds = range(1, cfg.search.rounds + 1) if step in ("search", "select") and t > 1 else (None,)
            for r in rounds:
                jobs = jobs_of(t, (step,), r)
                name = step if r is None or cfg.search.rounds == 1 else f"{step}{r}"
                parts.append(f"{name}={'done' if st.done(step, r or 1) else 'todo'}" + (f" [{jobs}]" if jobs else ""))
        print(f"stage {t}: " + "  ".join(parts))
        if t > 1 and st.candidates:
            cands = read_record(CandidateList, RunDir(run_dir).stage(t).candidates_json) or CandidateList()
            for k, c in enumerate(cands.candidates):
                print(f"    cand {k:02d} {c.name:<24} {candidate_state(run_dir, t, k, st.results.get(k))}")
        if st.selected:
            print(f"    winner {st.selected['winner']['name']}: {st.selected['reason']}")
            line = oracle_status(run_dir, t)
            jobs = jobs_of(t, ("oracle", "oracle-summary"))
            print(f"    {line}" + (f" [{jobs}]" if jobs else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel this run's queued/running jobs (ids from RUN_DIR/jobs.json) — nothing else."""
    run_dir = Path(args.run_dir).resolve()
    from jobs.autopilot import poll_jobs

    live = get_cluster("slurm").cancel(list(poll_jobs(run_dir)))  # the autopilot's poll jobs first: no new stage
    live += cancel_jobs(load_jobs(run_dir))
    if live:
        print(f"cancelled {' '.join(live)}")
    lock = read_json(RunDir(run_dir).lock)
    if lock and lock_holder_alive(lock) and lock.get("pid") != os.getpid():
        os.kill(int(lock["pid"]), signal.SIGTERM)  # a local/debug run: its driver process
        print(f"stopped the local submitter pid {lock['pid']}")
    elif not live:
        print("nothing to cancel")
    return 0
