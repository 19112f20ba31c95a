"""Where the jobs of a run execute: ONE executor factory and a small protocol per executor (issue #16 item 3).

Every job the suite submits (search array, select, train, evaluate, oracle array and summary,
``submit-train``) gets its executor from :func:`make_executor`; what differs between executors is a
:class:`Cluster`:

* ``slurm`` (:class:`Slurm`) — sbatch through submitit. Jobs outlive the submitter (``queues``), so a
  run's steps are queued at once and chained by dependencies; squeue/sacct give the states, scancel
  cancels. All SLURM command lines and state names of ``jobs/`` are here.
* ``local`` (submitit's LocalExecutor, subprocesses) and ``debug`` (in-process) (:class:`Local`) — jobs
  run inside the submitter, which waits for each; nothing stays queued, nothing is left to cancel.

RUN_DIR/jobs.json records every job (stage, step, job_id, index, executor, time); a run's active jobs
and a job's state are asked of the cluster that ran it. Importing this module does not import submitit
(``jobs.engine.runs`` reads the state vocabulary; STYLE.md R1).

A new executor: a :class:`Cluster` subclass registered in ``CLUSTERS`` and its name in the ``Executor``
Literal of jobs/config.py (``cluster.executor``; the ``--executor`` choices read it).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_tools.atomic import atomic_write_json
from jobs.config import ClusterCfg
from jobs.engine.rundir import JobRecord, JobsLedger, RunDir, read_json, read_record
from model.structs import from_dict

if TYPE_CHECKING:
    import submitit

__all__ = [
    "REPO",
    "JOB_KINDS",
    "Cluster",
    "Slurm",
    "Local",
    "CLUSTERS",
    "get_cluster",
    "resources",
    "make_executor",
    "load_jobs",
    "record_jobs",
    "job_states",
    "cancel_jobs",
    "queue_states",
    "queue_reachable",
    "queued_ids",
    "accounting_states",
]

REPO = Path(__file__).resolve().parents[1]  # a job imports jobs/ and model/ from this checkout
# job kind -> the stage-pipeline step whose resources it gets
JOB_KINDS = {
    "search": "search",
    "select": "select",
    "train": "train",
    "evaluate": "evaluate",
    "oracle": "train",  # one full training per candidate
    "oracle-summary": "select",  # reads JSON: CPU only
    "autopilot": "autopilot",  # one poll: ingests crawls and submits; CPU only, autopilot.time_min
}


def resources(cc: ClusterCfg, step: str) -> dict[str, Any]:
    """submitit parameters of one job kind, a key of ``JOB_KINDS`` (the numbers the sbatch scripts document)."""
    step = JOB_KINDS[step]
    gpus = cc.gpus_per_node
    one = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": cc.cpus_per_task, "mem_gb": cc.mem_gb}
    if step == "search":
        return {**one, "timeout_min": cc.search_time_min, **({"gpus_per_node": 1} if gpus else {})}
    if step == "select":  # reads JSON and copies one checkpoint: CPU only
        return {**one, "cpus_per_task": 1, "timeout_min": 10}
    if step == "autopilot":  # the time limit is autopilot.time_min (jobs/autopilot.py sets it)
        return {**one, "timeout_min": 60}
    if step == "evaluate":
        return {**one, "timeout_min": cc.eval_time_min, **({"gpus_per_node": 1} if gpus else {})}
    return {
        "nodes": cc.nodes,
        "tasks_per_node": max(gpus, 1),  # one rank per GPU
        "cpus_per_task": cc.cpus_per_task,
        "mem_gb": cc.mem_gb,
        "timeout_min": cc.train_time_min,
        **({"gpus_per_node": gpus} if gpus else {}),
    }


class Cluster:
    """What the suite asks of an executor. Job ids are strings; array tasks are ``JOB_TASK`` where they exist."""

    kind: str
    queues: bool  # True: jobs outlive the submitter (submit at once, chained); False: it runs and waits for each

    def parameters(self, cc: ClusterCfg, after: Sequence[str]) -> dict[str, Any]:
        """Executor-specific submitit parameters (``after``: clauses from :meth:`dependency`)."""
        return {}

    def dependency(self, how: str, job_ids: Iterable[str]) -> list[str]:
        """Clauses making a job wait for these (``how``: afterok or afterany; an array waits by its master id)."""
        raise NotImplementedError(f"executor {self.kind} runs jobs in the submitter: there is nothing to wait for")

    def queued(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """job id -> (state, reason) of the given jobs still queued or running."""
        return {}

    def final(self, job_ids: Sequence[str]) -> dict[str, str]:
        """job id -> final state of jobs that left the queue (empty where unknown)."""
        return {}

    def is_active(self, state: str, reason: str = "") -> bool:
        """A queued job that will still run (one whose dependency can never be met is not)."""
        return False

    def is_running(self, state: str) -> bool:
        """A queued job that has started."""
        return False

    def is_failed(self, state: str) -> bool:
        """A final state that means the job did not finish its work."""
        return False

    def active(self, run_dir: Path) -> dict[tuple[int, str], list[JobRecord]]:
        """(stage, step) -> this run's jobs on this executor that are queued or running and will still run."""
        recs = [r for r in load_jobs(run_dir) if r.executor == self.kind]
        states = self.queued([r.job_id for r in recs])
        out: dict[tuple[int, str], list[JobRecord]] = {}
        for r in recs:
            if self.is_active(*states.get(r.job_id, ("", ""))):
                out.setdefault((r.stage, r.step), []).append(r)
        return out

    def describe(self, job_ids: Sequence[str]) -> dict[str, str]:
        """job id -> the state ``status`` shows."""
        return {j: self.kind for j in job_ids}

    def cancel(self, job_ids: Sequence[str]) -> list[str]:
        """Cancel those of the jobs still queued or running; returns their ids."""
        return []


class Local(Cluster):
    """``local`` / ``debug``: jobs ran inside the submitter (its lock names it; ``cancel`` stops it)."""

    queues = False

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def active(self, run_dir: Path) -> dict[tuple[int, str], list[dict[str, Any]]]:
        return {}  # nothing outlives the submitter


def _slurm(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):  # a hung slurmctld (TimeoutExpired): no answer, not an empty queue
        return None
    return proc.stdout if proc.returncode == 0 else None


def queued_ids() -> set[str] | None:
    """The ids of the jobs in squeue now; None when it does not answer (not an empty queue)."""
    out = _slurm(["squeue", "-h", "-o", "%i"])
    return None if out is None else set(out.split())


def queue_reachable() -> bool:
    """Whether squeue answers now (a timed-out slurmctld reads as an empty queue to ``queue_states``)."""
    return queued_ids() is not None


def queue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) of the given jobs still in squeue (array tasks one per line)."""
    if not job_ids:
        return {}
    out = _slurm(["squeue", "-h", "-r", "-o", "%i|%T|%r"]) or ""
    wanted, states = set(job_ids), {}
    for line in out.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        if jid in wanted:
            states[jid] = (state, reason)
    return states


def accounting_states(job_ids: Sequence[str]) -> dict[str, str]:
    """job id -> final state from sacct (empty without accounting)."""
    if not job_ids:
        return {}
    out = _slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"]) or ""
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}


class Slurm(Cluster):
    """sbatch through submitit; squeue/sacct/scancel."""

    kind = "slurm"
    queues = True
    ACTIVE = frozenset(
        {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}
    )
    RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING"})
    FAILED = frozenset(
        {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "CANCELLED"}
    )

    def parameters(self, cc: ClusterCfg, after: Sequence[str]) -> dict[str, Any]:
        extra = {**cc.extra_sbatch, **{k: v for k, v in (("account", cc.account), ("qos", cc.qos)) if v}}
        if after:  # a failed dependency removes the rest of the chain instead of leaving it pending forever
            extra.update({"dependency": ",".join(after), "kill-on-invalid-dep": "yes"})
        setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}", *cc.setup]
        return {
            "slurm_signal_delay_s": cc.signal_delay_s,
            "slurm_setup": setup,
            **({"slurm_partition": cc.partition} if cc.partition else {}),
            "slurm_additional_parameters": extra,
            "slurm_array_parallelism": cc.array_parallelism,
        }

    def dependency(self, how: str, job_ids: Iterable[str]) -> list[str]:
        return [f"{how}:{j}" for j in sorted({j.split("_")[0] for j in job_ids})]

    def queued(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        return queue_states(job_ids)

    def final(self, job_ids: Sequence[str]) -> dict[str, str]:
        return accounting_states(job_ids)

    def is_active(self, state: str, reason: str = "") -> bool:
        return state in self.ACTIVE and "DependencyNeverSatisfied" not in reason

    def is_running(self, state: str) -> bool:
        return state in self.RUNNING

    def is_failed(self, state: str) -> bool:
        return state.split(" ")[0] in self.FAILED  # sacct: "CANCELLED by 0"

    def describe(self, job_ids: Sequence[str]) -> dict[str, str]:
        queued = self.queued(job_ids)
        final = self.final([j for j in job_ids if j not in queued])
        # not in accounting: cancelled before it started (or no accounting at all)
        return {j: queued[j][0] if j in queued else final.get(j, "GONE") for j in job_ids}

    def cancel(self, job_ids: Sequence[str]) -> list[str]:
        live = [j for j, (state, _) in self.queued(job_ids).items() if state in self.ACTIVE]
        if live:
            subprocess.run(["scancel", *live], check=False)
        return live


CLUSTERS: dict[str, Cluster] = {"slurm": Slurm(), "local": Local("local"), "debug": Local("debug")}


def get_cluster(kind: str) -> Cluster:
    """The :class:`Cluster` of ``cluster.executor`` / ``--executor``.

    Raises:
        ValueError: no such executor.
    """
    try:
        return CLUSTERS[kind]
    except KeyError:
        raise ValueError(f"unknown executor {kind!r}; expected one of {', '.join(CLUSTERS)}") from None


def make_executor(
    cc: ClusterCfg,
    folder: Path,
    executor: str | None = None,
    step: str = "train",
    *,
    run: str | None = None,
    after: Sequence[str] = (),
) -> submitit.Executor:
    """The submitit executor of one job: every job the suite submits comes from here.

    Args:
        cc: the run's ``cluster`` section.
        folder: submitit's folder (RUN_DIR/submitit); each job logs to ``folder/<job id>``.
        executor: a key of ``CLUSTERS`` (default ``cc.executor``).
        step: the job kind, a key of ``JOB_KINDS`` (its resources); default: a stage training (``submit-train``).
        run: the run's name; the job is named ``growclip-<run>-<step>`` (``growclip-<step>`` without it).
        after: dependency clauses (``Cluster.dependency``) the job waits for.

    Raises:
        ValueError: an unknown executor.
    """
    import submitit

    kind = executor or cc.executor
    cluster = get_cluster(kind)
    ex = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=kind, slurm_max_num_timeout=cc.max_requeues)
    ex.update_parameters(name="-".join(["growclip", *([run] if run else []), step]), **resources(cc, step))
    ex.update_parameters(**cluster.parameters(cc, after))
    return ex


# ------------------------------------------------------------------------------------------ jobs.json
def load_jobs(run_dir: Path) -> list[JobRecord]:
    """The job records of RUN_DIR/jobs.json, in submission order (none before the first submission)."""
    ledger = read_record(JobsLedger, RunDir(run_dir).jobs_json)
    return list(ledger.jobs) if ledger is not None else []


def record_jobs(run_dir: Path, new: list[dict[str, Any]]) -> None:
    """Append job records (stage, step, job_id, index, executor, time) to RUN_DIR/jobs.json atomically.

    Each record is validated as a :class:`JobRecord` first, so the ledger only ever gains complete entries.
    """
    path = RunDir(run_dir).jobs_json
    for rec in new:
        from_dict(JobRecord, rec, path=str(path))
    data = read_json(path) or {"jobs": []}
    data["jobs"].extend(new)
    atomic_write_json(path, data)


def _by_executor(records: Iterable[JobRecord]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.executor, []).append(r.job_id)
    return groups


def job_states(records: Sequence[JobRecord]) -> list[str]:
    """The state ``status`` shows for each job record, in order (one queue query per executor)."""
    states = {kind: CLUSTERS[kind].describe(ids) for kind, ids in _by_executor(records).items() if kind in CLUSTERS}
    return [states.get(r.executor, {}).get(r.job_id, r.executor) for r in records]


def cancel_jobs(records: Iterable[JobRecord]) -> list[str]:
    """Cancel the recorded jobs still queued or running, each on its executor; returns their ids."""
    return [j for kind, ids in _by_executor(records).items() if kind in CLUSTERS for j in CLUSTERS[kind].cancel(ids)]
