"""``python -m jobs plan | submit | status | cancel | report``: the stage pipeline on SLURM, locally or in-process.

Per stage t (DESIGN.md steps 1-3): ``search`` (one array task per candidate, ``map_array``, at most
``cluster.array_parallelism`` at once; t > 1) → ``select`` → ``train`` (``TrainJob``, ``--init`` the
winner's grown weights) → ``evaluate``. Executors (``cluster.executor`` or ``--executor``):

* ``slurm`` — everything is submitted at once and chained with SLURM dependencies: search(t)
  ``afterok`` train(t-1); select ``afterany`` the search array (failed candidates are tolerated down
  to ``search.min_successful``; select itself decides); train ``afterok`` select; evaluate ``afterok``
  train; ``--kill-on-invalid-dep=yes`` removes the rest of a chain whose job failed. Job ids go to
  RUN_DIR/jobs.json; the submitter returns at once.
* ``local`` (submitit's LocalExecutor, subprocesses, the embedded default) and ``debug``
  (in-process) run the same callables stage after stage and wait for them.

What is done is read from the run dir (``jobs.engine.pipeline``): a resubmission submits nothing for
finished work, re-uses jobs of this run still queued or running, and resubmits only what is missing
(e.g. a killed array task). RUN_DIR/lock keeps two submitters off one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json, atomic_write_text
from data_tools.cli_errors import fail
from jobs.config import ClusterCfg, ConfigError, RunCfg, dump_cfg, load_cfg
from jobs.engine.data import check_corpus
from jobs.engine.oracle import oracle_status
from jobs.engine.pipeline import STEPS, max_candidates, read_json, stage_candidates, stage_state
from jobs.engine.rundir import RUN_CONFIG, check_run_dir
from jobs.runlock import LockError, lock_holder_alive, run_lock

__all__ = ["cmd_plan", "cmd_submit", "cmd_status", "cmd_cancel", "parse_stages", "plan_actions"]

REPO = Path(__file__).resolve().parents[1]
SBATCH = {
    "search": "search_array.sbatch",
    "select": "stage.sbatch --step select",
    "train": "train.sbatch",
    "evaluate": "evaluate.sbatch",
}
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


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


# ------------------------------------------------------------------------------------------ jobs.json
def load_jobs(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "jobs.json") or {"jobs": []}


def record_jobs(run_dir: Path, new: list[dict[str, Any]]) -> None:
    """Append job records (stage, step, job_id, index, executor, time) to RUN_DIR/jobs.json atomically."""
    data = load_jobs(run_dir)
    data["jobs"].extend(new)
    atomic_write_json(run_dir / "jobs.json", data)


def _slurm(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else None


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) of this run's jobs still in squeue (array tasks one per line)."""
    if not job_ids:
        return {}
    out = _slurm(["squeue", "-h", "-r", "-o", "%i|%T|%r"]) or ""
    wanted, states = set(job_ids), {}
    for line in out.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        if jid in wanted:
            states[jid] = (state, reason)
    return states


def accounting_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> final state from sacct (empty without accounting)."""
    if not job_ids:
        return {}
    out = _slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"]) or ""
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}


def active_jobs(run_dir: Path) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(stage, step) -> recorded slurm jobs of this run still queued/running (never-satisfiable ones excluded)."""
    recs = [r for r in load_jobs(run_dir)["jobs"] if r.get("executor") == "slurm"]
    states = queue_states([r["job_id"] for r in recs])
    out: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in recs:
        state, reason = states.get(r["job_id"], ("", ""))
        if state in ACTIVE and "DependencyNeverSatisfied" not in reason:
            out.setdefault((r["stage"], r["step"]), []).append(r)
    return out


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Action:
    """One step of one stage: done, already queued (ids), or to submit (indices for search)."""

    stage: int
    step: str
    status: str  # done | running | submit
    indices: list[int] = field(default_factory=list)  # search: candidate indices to submit
    running: list[str] = field(default_factory=list)  # ids of this run's jobs already queued for it
    after: list[tuple[str, int, str]] = field(default_factory=list)  # (dependency type, stage, step)
    note: str = ""


def plan_actions(cfg: RunCfg, run_dir: Path, stages: list[int], active: dict | None = None) -> list[Action]:
    """What a submission of ``stages`` does, from the run dir and this run's queued jobs.

    Raises:
        ConfigError: a stage needs an earlier one that is neither finished, queued nor submitted.
    """
    active = active or {}
    actions: dict[tuple[int, str], Action] = {}
    for t in stages:
        st = stage_state(cfg, run_dir, t)
        for step in STEPS:
            if t == 1 and step in ("search", "select"):
                continue
            act = Action(t, step, "done")
            running = active.get((t, step), [])
            if not st.done(step):
                act.running = [r["job_id"] for r in running]
                if step == "search":
                    busy = {r.get("index") for r in running}
                    want = st.search_missing if st.candidates is not None else list(range(max_candidates(cfg.growth)))
                    act.indices = [k for k in want if k not in busy]
                    if st.candidates is None:
                        act.note = f"candidates known once stage {t - 1} is trained: array of {len(want)} (upper bound)"
                    else:
                        act.note = f"{st.candidates} candidates, {len(st.results)} scored"
                    act.status = "submit" if act.indices else "running"
                else:
                    act.status = "running" if running else "submit"
            actions[(t, step)] = act
    need = {
        "search": [("afterok", -1, "train")],
        "select": [("afterany", 0, "search")],
        "train": [("afterok", 0, "select")],
        "evaluate": [("afterok", 0, "train")],
    }
    for (t, step), act in actions.items():
        if act.status == "done":
            continue
        for kind, dt, dstep in need[step]:
            s = t + dt
            if s < 1 or (s == 1 and dstep in ("search", "select")):
                continue
            dep = actions.get((s, dstep))
            if dep is None:
                st = stage_state(cfg, run_dir, s)
                if st.done(dstep):
                    continue
                running = active.get((s, dstep), [])
                if not running:
                    raise ConfigError(
                        f"stage {t} {step} needs stage {s} {dstep}, which is neither finished nor queued: "
                        f"include stage {s} in --stages"
                    )
                dep = Action(s, dstep, "running", running=[r["job_id"] for r in running])
                actions[(s, dstep)] = dep
            if dep.status != "done":
                act.after.append((kind, s, dstep))
    return sorted(actions.values(), key=lambda a: (a.stage, STEPS.index(a.step)))


def resources(cc: ClusterCfg, step: str) -> dict[str, Any]:
    """submitit parameters of one step (the same numbers the sbatch scripts document)."""
    gpus = cc.gpus_per_node
    one = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": cc.cpus_per_task, "mem_gb": cc.mem_gb}
    if step == "search":
        return {**one, "timeout_min": cc.search_time_min, **({"gpus_per_node": 1} if gpus else {})}
    if step == "select":  # reads JSON and copies one checkpoint: CPU only
        return {**one, "cpus_per_task": 1, "timeout_min": 10}
    if step == "evaluate":
        return {**one, "timeout_min": cc.eval_time_min, **({"gpus_per_node": 1} if gpus else {})}
    return {
        "nodes": cc.nodes,
        "tasks_per_node": max(gpus, 1),
        "cpus_per_task": cc.cpus_per_task,
        "mem_gb": cc.mem_gb,
        "timeout_min": cc.train_time_min,
        **({"gpus_per_node": gpus} if gpus else {}),
    }


def format_plan(cfg: RunCfg, run_dir: Path, actions: list[Action], executor: str) -> str:
    lines = [f"run dir {run_dir}  executor {executor}  data {cfg.data.root}"]
    for a in actions:
        res = resources(cfg.cluster, a.step)
        deps = ",".join(f"{k}:<stage{s}.{d}>" for k, s, d in a.after)
        if a.status == "done":
            lines.append(f"stage {a.stage} {a.step:<8} done (skipped)")
            continue
        if a.status == "running":
            lines.append(f"stage {a.stage} {a.step:<8} already queued: {' '.join(a.running)}")
            continue
        what = f"array {a.indices} (parallelism {cfg.cluster.array_parallelism})" if a.step == "search" else "job"
        lines.append(
            f"stage {a.stage} {a.step:<8} submit {what} {a.note}".rstrip()
            + f"\n    resources {res}"
            + (f"\n    dependency {deps}" if deps else "")
        )
        arr = f"--array={','.join(map(str, a.indices))}%{cfg.cluster.array_parallelism} " if a.step == "search" else ""
        dep = f"--dependency={deps} " if deps else ""
        lines.append(f"    sbatch {arr}{dep}slurm/{SBATCH[a.step]} RUN_DIR/config.yaml {a.stage}")
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
def _executor(cfg: RunCfg, run_dir: Path, kind: str, step: str, after: list[str]) -> Any:
    import submitit

    cc = cfg.cluster
    folder = str(run_dir / "submitit" / "%j")
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=cc.max_requeues)
    ex.update_parameters(name=f"growclip-{cfg.name}-{step}", **resources(cc, step))
    if kind == "slurm":
        extra = {**cc.extra_sbatch, **{k: v for k, v in (("account", cc.account), ("qos", cc.qos)) if v}}
        if after:
            extra.update({"dependency": ",".join(after), "kill-on-invalid-dep": "yes"})
        setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}", *cc.setup]
        part = {"slurm_partition": cc.partition} if cc.partition else {}
        ex.update_parameters(
            slurm_signal_delay_s=cc.signal_delay_s,
            slurm_setup=setup,
            **part,
            slurm_additional_parameters=extra,
            slurm_array_parallelism=cc.array_parallelism,
        )
    return ex


def _callable(cfg_path: Path, run_dir: Path, stage: int, step: str) -> Any:
    from jobs.stage_jobs import EvalJob, SearchJob, SelectJob
    from jobs.submit_train import TrainJob

    c, r = str(cfg_path), str(run_dir)
    if step == "search":
        return SearchJob(c, stage, r)
    if step == "select":
        return SelectJob(c, stage, r)
    if step == "evaluate":
        return EvalJob(c, stage, r)
    init = str(run_dir / f"stage_{stage:02d}" / "selected.pt") if stage > 1 else None
    return TrainJob(c, (), stage, r, init, evaluate=False)


def submit_slurm(cfg: RunCfg, cfg_path: Path, run_dir: Path, stages: list[int]) -> list[dict[str, Any]]:
    """Submit every missing step of ``stages`` at once, chained by dependencies; returns the new records."""
    actions = plan_actions(cfg, run_dir, stages, active_jobs(run_dir))
    ids: dict[tuple[int, str], list[str]] = {}
    new: list[dict[str, Any]] = []
    for a in actions:
        ids[(a.stage, a.step)] = list(a.running)
        if a.status != "submit":
            continue
        after = []
        for kind, s, d in a.after:
            dep_ids = sorted({j.split("_")[0] for j in ids.get((s, d), [])})  # an array: its master id
            after += [f"{kind}:{j}" for j in dep_ids]
        ex = _executor(cfg, run_dir, "slurm", a.step, after)
        fn = _callable(cfg_path, run_dir, a.stage, a.step)
        jobs = ex.map_array(fn, a.indices) if a.step == "search" else [ex.submit(fn)]
        now = time.time()
        for k, job in enumerate(jobs):
            rec = {"stage": a.stage, "step": a.step, "job_id": job.job_id, "executor": "slurm", "time": now}
            if a.step == "search":
                rec["index"] = a.indices[k]
            new.append(rec)
            ids[(a.stage, a.step)].append(job.job_id)
        print(
            f"stage {a.stage} {a.step}: submitted {' '.join(j.job_id for j in jobs)}"
            + (f" after {','.join(after)}" if after else ""),
            flush=True,
        )
        record_jobs(run_dir, new[-len(jobs) :])
    return new


def run_local(cfg: RunCfg, cfg_path: Path, run_dir: Path, stages: list[int], kind: str) -> int:
    """Run the stages one after the other through the local/debug executor; wait for each step."""
    os.environ["PYTHONPATH"] = (
        f"{REPO}{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(REPO)
    )
    for t in stages:
        for a in plan_actions(cfg, run_dir, [t]):
            if a.status == "done":
                print(f"stage {t} {a.step}: done (skipped)", flush=True)
                continue
            ex = _executor(cfg, run_dir, kind, a.step, [])
            fn = _callable(cfg_path, run_dir, t, a.step)
            t0 = time.time()
            if a.step == "search":
                failed = 0
                par = cfg.cluster.array_parallelism
                for i in range(0, len(a.indices), par):
                    chunk = a.indices[i : i + par]
                    jobs = ex.map_array(fn, chunk)
                    record_jobs(
                        run_dir,
                        [
                            {
                                "stage": t,
                                "step": "search",
                                "index": k,
                                "job_id": j.job_id,
                                "executor": kind,
                                "time": time.time(),
                            }
                            for k, j in zip(chunk, jobs, strict=True)
                        ],
                    )
                    for k, job in zip(chunk, jobs, strict=True):
                        try:
                            job.result()
                        except Exception as exc:  # tolerated: select enforces search.min_successful
                            failed += 1
                            print(
                                f"stage {t} candidate {k} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr
                            )
                ok, secs = len(a.indices) - failed, time.time() - t0
                print(f"stage {t} search: {ok}/{len(a.indices)} candidates finished ({secs:.0f} s)", flush=True)
                continue
            job = ex.submit(fn)
            record_jobs(
                run_dir, [{"stage": t, "step": a.step, "job_id": job.job_id, "executor": kind, "time": time.time()}]
            )
            try:
                out = job.result()
            except Exception as exc:
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                return fail(
                    f"stage {t} {a.step} failed: {last} (job {job.job_id}); its log and traceback are in "
                    f"{run_dir / 'submitit' / str(job.job_id)}; fix the cause, then re-run the same submit",
                    1,
                )
            if a.step == "select":
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
    cfg = replace(cfg, data=replace(cfg.data, root=cfg.data.root.resolve()))
    run_dir = Path(args.run_dir or cfg.run_dir).resolve()
    kind = args.executor or cfg.cluster.executor
    cfg = replace(cfg, cluster=replace(cfg.cluster, executor=kind))
    stages = parse_stages(args.stages, cfg.data.stages)
    check_corpus(cfg.data.root, cfg.data.stages, cfg.model.text.vocab_size)
    check_run_dir(run_dir, cfg)  # the run dir's config is this one (launch settings may change)
    return cfg, run_dir, run_dir / RUN_CONFIG, stages, kind


def cmd_plan(args: argparse.Namespace) -> int:
    """Dry run: what `submit` would do (no job, no file written)."""
    try:
        cfg, run_dir, _, stages, kind = _prepare(args)
        actions = plan_actions(cfg, run_dir, stages, active_jobs(run_dir) if kind == "slurm" else {})
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
        text = dump_cfg(cfg)
        with run_lock(run_dir, break_lock=args.break_lock):
            check_run_dir(run_dir, cfg)  # again under the lock: another submitter may have written it meanwhile
            atomic_write_text(cfg_path, text)
            actions = plan_actions(cfg, run_dir, stages, active_jobs(run_dir) if kind == "slurm" else {})
            atomic_write_json(
                run_dir / "plan.json",
                {"executor": kind, "stages": stages, "time": time.time(), "actions": [vars(a) for a in actions]},
            )
            if kind == "slurm":
                new = submit_slurm(cfg, cfg_path, run_dir, stages)
                print(f"{len(new)} jobs submitted" + ("" if new else " (nothing to do: finished or queued)"))
            else:
                rc = run_local(cfg, cfg_path, run_dir, stages, kind)
        if kind == "slurm":
            if not args.wait:
                return 0
            while active_jobs(run_dir):  # the lock is released: status/cancel work meanwhile
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
    path = Path(run_dir) / RUN_CONFIG
    if not path.exists():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a submitted run")
    return load_cfg(path)


def _job_state(rec: dict[str, Any], queued: dict[str, tuple[str, str]], final: dict[str, str]) -> str:
    if rec.get("executor") != "slurm":
        return rec.get("executor", "?")  # local/debug jobs ran inside the submitter
    if rec["job_id"] in queued:
        return queued[rec["job_id"]][0]
    return final.get(rec["job_id"], "GONE")  # cancelled before it started: not in accounting


def _candidate_state(run_dir: Path, stage: int, index: int, result: dict[str, Any] | None) -> str:
    """One candidate in ``status``: its score, its failure, or how far it got (from cand_KK/events.jsonl)."""
    from jobs.engine.metrics import read_events  # h5py: only when there is a candidate to show

    if result:
        return f"score {result['score']:.4f}"
    cdir = run_dir / f"stage_{stage:02d}" / "search" / f"cand_{index:02d}"
    failed = read_json(cdir / "failed.json")
    if failed:
        return f"failed: {failed['error']}"
    last = next(iter(read_events(cdir / "events.jsonl")[-1:]), None)
    if last is None:
        return "no result"
    if last["event"] == "preempted":
        return f"preempted at step {last['step']} (checkpointed; resumes when requeued or resubmitted)"
    return f"no result yet (last event: {last['event']})"


def cmd_status(args: argparse.Namespace) -> int:
    """Each stage's steps (run dir + squeue/sacct), candidates and winner."""
    run_dir = Path(args.run_dir).resolve()
    try:
        cfg = _run_dir_cfg(run_dir)
    except ConfigError as exc:
        return fail(exc, 2)
    recs = load_jobs(run_dir)["jobs"]
    slurm_ids = [r["job_id"] for r in recs if r.get("executor") == "slurm"]
    queued = queue_states(slurm_ids)
    final = accounting_states([j for j in slurm_ids if j not in queued])
    lock = read_json(run_dir / "lock")
    if lock:
        alive = lock_holder_alive(lock)
        print(f"lock: pid {lock['pid']} on {lock['host']} ({'alive' if alive else 'stale' if alive is False else '?'})")
    for t in range(1, cfg.data.stages + 1):
        st = stage_state(cfg, run_dir, t)
        parts = []
        for step in STEPS:
            if t == 1 and step in ("search", "select"):
                continue
            mine = [r for r in recs if r["stage"] == t and r["step"] == step]
            jobs = " ".join(f"{r['job_id']}:{_job_state(r, queued, final)}" for r in mine[-8:])
            parts.append(f"{step}={'done' if st.done(step) else 'todo'}" + (f" [{jobs}]" if jobs else ""))
        print(f"stage {t}: " + "  ".join(parts))
        if t > 1 and st.candidates:
            cands = read_json(run_dir / f"stage_{t:02d}" / "search" / "candidates.json") or {"candidates": []}
            for k, c in enumerate(cands["candidates"]):
                print(f"    cand {k:02d} {c['name']:<24} {_candidate_state(run_dir, t, k, st.results.get(k))}")
        if st.selected:
            print(f"    winner {st.selected['winner']['name']}: {st.selected['reason']}")
            line = oracle_status(run_dir, t)
            mine = [r for r in recs if r["stage"] == t and r["step"] in ("oracle", "oracle-summary")]
            jobs = " ".join(f"{r['job_id']}:{_job_state(r, queued, final)}" for r in mine[-8:])
            print(f"    {line}" + (f" [{jobs}]" if jobs else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """scancel this run's queued/running jobs (ids from RUN_DIR/jobs.json) — nothing else."""
    run_dir = Path(args.run_dir).resolve()
    recs = load_jobs(run_dir)["jobs"]
    slurm_ids = [r["job_id"] for r in recs if r.get("executor") == "slurm"]
    live = [j for j, (state, _) in queue_states(slurm_ids).items() if state in ACTIVE]
    if live:
        subprocess.run(["scancel", *live], check=False)
        print(f"cancelled {' '.join(live)}")
    lock = read_json(run_dir / "lock")
    if lock and lock_holder_alive(lock) and lock.get("pid") != os.getpid():
        os.kill(int(lock["pid"]), signal.SIGTERM)  # a local/debug run: its driver process
        print(f"stopped the local submitter pid {lock['pid']}")
    elif not live:
        print("nothing to cancel")
    return 0
