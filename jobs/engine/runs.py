"""One line per run under a RUN_ROOT, for admins (``python -m jobs runs RUN_ROOT``).

Per run: name, stages evaluated / planned (``data.stages`` of its config), state, last update (the
newest file in the run dir) and a detail. Read from markers only (config.yaml, lock, jobs.json,
``eval/metrics.json``, ``final.pt``, ``failed.json``, the trainer's events) — cheap on a shared
filesystem, and no event log is parsed beyond its last line. States:

* ``finished``   every planned stage is evaluated;
* ``running``    the run's lock is held by a live submitter (local/debug executors), or one of its
                 SLURM jobs is running (also: a lock taken on another host, which cannot be checked);
* ``queued``     SLURM jobs of the run are pending and none is running;
* ``failed``     nothing is active and a step failed: a search candidate's ``failed.json`` without a
                 result, or the latest SLURM job of a step not done ended FAILED/TIMEOUT/OUT_OF_MEMORY/...;
* ``incomplete`` nothing is active, no failure is recorded, and stages are left (stopped, killed, a
                 stale lock, or only some stages submitted; the detail says which).

SLURM states come from the caller (``queued``: job id → squeue state; ``ended``: job id → sacct
state), so this module never runs SLURM commands itself (STYLE.md R1: the CLI entry does); which
state is running or failed is the executor's word (``jobs.cluster``). :func:`candidate_state` is one
search candidate's line in ``python -m jobs status``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.cluster import CLUSTERS
from jobs.engine.records import candidate_status
from jobs.engine.rundir import RunDir
from jobs.runlock import lock_holder_alive

__all__ = ["RunLine", "find_runs", "slurm_job_ids", "run_line", "format_runs", "candidate_state"]


@dataclass(frozen=True)
class RunLine:
    """What ``jobs runs`` prints for one run."""

    name: str  # config name; "name (dir)" when the directory is named otherwise
    path: Path
    stages_done: int  # stages with eval/metrics.json
    stages_planned: int  # data.stages of the run's config
    state: str  # finished | running | queued | failed | incomplete
    last_update: float | None  # newest mtime in the run dir (epoch seconds)
    detail: str


def find_runs(root: Path) -> list[Path]:
    """The run dirs directly under ``root`` (or ``root`` itself when it is one), sorted by name.

    Raises:
        ValueError: ``root`` does not exist or is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; pass RUN_ROOT (run_root of the configs, e.g. runs)")
    if RunDir(root).looks_like_run():
        return [root]
    return sorted(p for p in root.iterdir() if RunDir(p).looks_like_run())


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError):
        return None
    try:
        return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError):
        return None


def slurm_job_ids(run_dir: Path) -> list[str]:
    """This run's SLURM job ids as recorded in RUN_DIR/jobs.json (array tasks as ``JOB_TASK``)."""
    jobs = (_read(RunDir(run_dir).jobs_json) or {}).get("jobs", [])
    return [str(j["job_id"]) for j in jobs if j.get("executor") == "slurm" and "job_id" in j]


def _last_update(run_dir: Path) -> float | None:
    newest = None
    for dirpath, _, files in os.walk(run_dir):
        for f in files:
            try:
                m = os.stat(os.path.join(dirpath, f)).st_mtime
            except OSError:
                continue
            newest = m if newest is None or m > newest else newest
    return newest


def _last_step(events: Path) -> str:
    """'step N' from the last readable step record of an events.jsonl (reads only its tail)."""
    try:
        with open(events, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 65536))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            return f"step {rec['step']}"
    return ""


def _stage_step(run_dir: Path, t: int) -> tuple[str, str | None]:
    """(what is done of stage t in words, failure or None) from its markers."""
    rd = RunDir(run_dir)
    sd = rd.stage(t)
    if not sd.path.is_dir():
        later = any(s > t for s in rd.stages())
        return ("missing (later stages exist)" if later else "not started"), None
    if sd.eval_metrics.exists():
        return "evaluated", None
    if sd.final.exists():
        return "trained, not evaluated", None
    if sd.train.events.exists():
        return f"training stopped at {_last_step(sd.train.events) or 'start'}", None
    if sd.selected_json.exists():  # candidate failures before it were tolerated by select
        return "selected, training not started", None
    for cd in sd.cands():
        if cd.failed_json.exists() and not cd.result_json.exists():
            err = (_read(cd.failed_json) or {}).get("error", "?")
            return "search failed", f"stage {t} {cd.path.name} failed: {err}"
    if sd.search.exists():
        return "searching", None
    return "not started", None


def run_line(run_dir: Path, queued: Mapping[str, str] | None = None, ended: Mapping[str, str] | None = None) -> RunLine:
    """Summarise one run (module docstring: states).

    Args:
        run_dir: RUN_ROOT/<run>.
        queued: job id → squeue state of jobs still in the queue; None when squeue is not reachable.
        ended: job id → sacct state of jobs that left the queue (optional).
    """
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg = _read(rd.config_yaml) or {}
    plan = _read(rd.plan_json) or {}
    stage_dirs = list(rd.stages())
    planned = int((cfg.get("data") or {}).get("stages") or 0) or max([*plan.get("stages", []), *stage_dirs, 0])
    name = str(cfg.get("name") or run_dir.name)
    if name != run_dir.name:
        name = f"{name} ({run_dir.name})"
    steps = {t: _stage_step(run_dir, t) for t in range(1, planned + 1)}
    done = sum(1 for what, _ in steps.values() if what == "evaluated")
    first_open = next((t for t in steps if steps[t][0] != "evaluated"), None)
    lock = _read(rd.lock)
    if not (isinstance(lock, dict) and "pid" in lock):
        lock = None  # no lock, or an empty/garbled one (its creator died while writing it)
    alive = lock_holder_alive(lock) if lock else False
    jobs = (_read(rd.jobs_json) or {}).get("jobs", [])
    slurm = [j for j in jobs if j.get("executor") == "slurm"]
    cluster = CLUSTERS["slurm"]
    in_queue = {str(j["job_id"]): queued[str(j["job_id"])] for j in slurm if queued and str(j["job_id"]) in queued}
    n_run = sum(1 for s in in_queue.values() if cluster.is_running(s))

    state, detail = "incomplete", ""
    if planned and done == planned:
        state, detail = "finished", ""
    elif alive is True:
        state, detail = "running", f"submitter pid {lock.get('pid')} on {lock.get('host')}"
    elif n_run:
        state, detail = "running", f"slurm: {n_run} running, {len(in_queue) - n_run} pending"
    elif in_queue:
        state, detail = "queued", f"slurm: {len(in_queue)} pending"
    elif alive is None:
        state, detail = "running", f"lock held on host {lock.get('host')} (cannot check its pid from here)"
    else:
        failures = [f for _, f in steps.values() if f]
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for j in slurm:  # the latest attempt of each step decides
            latest[(j.get("stage"), j.get("step"), j.get("index"))] = j
        for (t, step, index), j in sorted(latest.items(), key=lambda kv: str(kv[0])):
            st = (ended or {}).get(str(j["job_id"]), "")
            if cluster.is_failed(st) and isinstance(t, int) and t in steps and steps[t][0] != "evaluated":
                what = f"{step}" + (f" cand {index}" if index is not None else "")
                failures.append(f"stage {t} {what}: slurm job {j['job_id']} {st}")
        if failures:
            state, detail = "failed", failures[0] + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else "")
        elif first_open is not None:
            submitted = plan.get("stages") or []
            if submitted and first_open not in submitted:
                detail = f"stage {first_open} not submitted (submitted: {submitted})"
            else:
                detail = f"stage {first_open}: {steps[first_open][0]}; nothing active"
            if lock is not None:
                detail += f"; stale lock (pid {lock.get('pid')} gone: --break-lock)"
            elif rd.lock.exists():
                detail += "; unreadable lock file (--break-lock)"
            if slurm and queued is None:
                detail += "; squeue not reachable: queued/running unknown"
    if state in ("running", "queued") and first_open is not None:
        detail = f"stage {first_open}: {steps[first_open][0]}; " + detail
    return RunLine(name, run_dir, done, planned, state, _last_update(run_dir), detail)


def candidate_state(run_dir: Path, stage: int, index: int, result: Mapping[str, Any] | None) -> str:
    """One candidate in ``status``: its score, its failure, or how far it got (from cand_KK/events.jsonl)."""
    if result:
        at = f" (round {result['round']}, {result['steps']} steps)" if result.get("round", 1) > 1 else ""
        return f"score {result['score']:.4f}{at}"
    st = candidate_status(RunDir(run_dir).stage(stage).cand(index))
    if st.state == "failed":
        return f"failed: {st.error}"
    if st.state == "preempted":
        return f"preempted at step {st.step} (checkpointed; resumes when requeued or resubmitted)"
    if st.last_event is None:
        return "no result"
    return f"no result yet (last event: {st.last_event})"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def format_runs(lines: list[RunLine], now: float | None = None) -> str:
    """An aligned table: NAME, STAGES (done/planned), STATE, LAST UPDATE (local time, age), DETAIL."""
    now = time.time() if now is None else now
    table = [["NAME", "STAGES", "STATE", "LAST UPDATE", "DETAIL"]]
    for r in lines:
        when = "-"
        if r.last_update is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.last_update))
            when += f" ({_age(max(0.0, now - r.last_update))})"
        table.append([r.name, f"{r.stages_done}/{r.stages_planned}", r.state, when, r.detail])
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + ("  " + row[4] if row[4] else "")
        for row in table
    ).rstrip()
