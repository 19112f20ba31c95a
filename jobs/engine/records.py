"""Typed records of a run dir's JSON files (issue #16), and the one candidate status.

Each record is a frozen dataclass read with the strict loader (``model.structs.from_dict``: an unknown key is
an error naming it), so a field lists every key its file has ever held, and every field has a default: a file
written before a key was added still loads. The writers keep writing plain dicts (``search``, ``select``,
``evaluate``); these records are how the readers see them. Paths come from :mod:`jobs.engine.rundir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from model.structs import from_dict

__all__ = [
    "CandidateList",
    "CandidateResult",
    "CandidateStatus",
    "EvalMetrics",
    "FailedRecord",
    "JobRecord",
    "JobsLedger",
    "OracleSummary",
    "RoundRanking",
    "Selection",
    "SelectionWinner",
    "candidate_status",
    "classify_candidate",
    "read_record",
]

R = TypeVar("R")
Number = int | float


def read_record(cls: type[R], path: Path) -> R | None:
    """The record ``cls`` of JSON file ``path``, or None when the file is not there (yet).

    Raises:
        ConfigError: the file holds a key ``cls`` does not know, or a value of the wrong type.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    return from_dict(cls, data, path=str(path))


@dataclass(frozen=True)
class CandidateEntry:
    """One kept candidate of ``candidates.json`` (``model.search_space.Candidate.to_dict()``)."""

    name: str = ""
    spec: dict[str, Any] | None = None
    cost: Number | None = None
    cost_ratio: float | None = None


@dataclass(frozen=True)
class PrunedEntry:
    name: str = ""
    reason: str = ""


@dataclass(frozen=True)
class CandidateList:
    """``stage_NN/search/candidates.json``: the stage's growth candidates, written once by the first search task."""

    stage: int | None = None
    data_ratio: float | None = None
    budget: str | None = None
    candidates: tuple[CandidateEntry, ...] = ()
    pruned: tuple[PrunedEntry, ...] = ()


@dataclass(frozen=True)
class CandidateResult:
    """``stage_NN/search/cand_KK/result.json``: a search candidate trained and scored (``jobs.engine.search``)."""

    format: str | None = None  # "growclip-search-result"
    status: str = "done"
    stage: int | None = None
    index: int | None = None
    name: str | None = None
    spec: dict[str, Any] | None = None  # ArchSpec.to_dict()
    cost: Number | None = None  # params or FLOPs per growth.budget
    cost_ratio: float | None = None
    params: int | None = None
    flops_per_sample: int | None = None
    steps: int | None = None  # search training steps (0: scored as grown)
    samples: int | None = None
    train_flops: int | None = None
    val_loss: float | None = None  # validate_model: held-out InfoNCE ...
    val_loss_se: float | None = None  # ... its standard error (results written since it was recorded)
    val_loss_refit: float | None = None  # ... at the temperature re-fitted on the held-out batches (same)
    proxy_acc1: float | None = None
    val_samples: int | None = None
    score: float | None = None  # SearchScore: the sum of the terms
    term_val_loss: float | None = None
    term_zeroshot: float | None = None
    term_cost: float | None = None
    growth: dict[str, Any] | None = None  # GrowthRecord.to_dict() + stage, candidate
    grown: str | None = None  # cand_KK/grown.pt
    seconds: float | None = None
    round: int = 1  # the search round this result ends (successive halving, issue #17)
    estimator: str | None = None  # search.estimator: "loss", "ema" or "refit" (jobs/engine/score.py ESTIMATED)
    checkpoint: str | None = None  # search.trajectory=train: the training state at the round's end
    history: tuple[dict[str, Any], ...] = ()  # earlier rounds: round, steps, val_loss, val_loss_se, proxy_acc1, score


@dataclass(frozen=True)
class FailedRecord:
    """``cand_KK/failed.json`` of a search (all keys) or an oracle candidate (error, traceback)."""

    stage: int | None = None
    index: int | None = None
    name: str | None = None
    error: str = "?"
    traceback: str | None = None
    time: float | None = None


@dataclass(frozen=True)
class SelectionWinner:
    index: int = 0
    name: str = ""
    spec: dict[str, Any] | None = None
    score: float | None = None


@dataclass(frozen=True)
class Selection:
    """``stage_NN/selected.json``: the search's winner, the reason and the table (``jobs.engine.select``)."""

    stage: int | None = None
    winner: SelectionWinner = SelectionWinner()
    reason: str = ""
    table: tuple[dict[str, Any], ...] = ()  # one row per candidate: index, name, status, params, score terms, rank
    growth: dict[str, Any] | None = None
    init: str | None = None  # stage_NN/selected.pt
    failed: tuple[int, ...] = ()
    score_formula: str | None = None
    rounds: int = 1  # search rounds ranked (1 before issue #17)
    continues: bool = False  # selected.pt is the winner's search training state: the stage's training continues it
    start_step: int = 0  # ... at this step (its search steps count toward train.steps)


@dataclass(frozen=True)
class EvalMetrics:
    """``stage_NN/eval/metrics.json`` (``jobs.engine.evaluate``: its module docstring lists the nested keys)."""

    format: str | None = None
    version: int | None = None
    checkpoint: str | None = None
    step: int | None = None
    samples_seen: int | None = None  # absent from evaluations written before it was recorded
    stage: int | None = None
    weights: str | None = None
    spec: dict[str, Any] | None = None
    tasks: dict[str, dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None  # a stage's evaluation: val_loss, val_loss_se, proxy_acc1, val_samples


@dataclass(frozen=True)
class RoundRanking:
    """``stage_NN/search/round_RR.json``: the ranking after search round r < rounds (``jobs.engine.select``); its
    ``survivors`` (candidate indices, best first) train in round r + 1, array task i taking ``survivors[i]``."""

    stage: int = 0
    round: int = 1
    steps: int = 0  # the steps every survivor had trained at the end of the round
    survivors: tuple[int, ...] = ()
    table: tuple[dict[str, Any], ...] = ()  # the round's candidates: index, name, status, score terms, rank
    reason: str = ""


@dataclass(frozen=True)
class OracleSummary:
    """``stage_NN/oracle/summary.json`` (``jobs.engine.oracle.summarize_oracle``): rows keyed like the oracle's
    results, Kendall tau of the search ranking against full training's, and the regret of the search's pick."""

    format: str | None = None  # "growclip-oracle"
    stage: int | None = None
    chosen: str | None = None
    candidates: tuple[dict[str, Any], ...] = ()
    missing: tuple[str, ...] = ()
    kendall_tau: dict[str, float | None] | None = None  # val_loss, mean_acc1
    regret_mean_acc1: float | None = None
    best_mean_acc1: str | None = None
    best_val_loss: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """One submitted job in ``RUN_DIR/jobs.json`` (``jobs.cluster.record_jobs``)."""

    stage: int = 0
    step: str = ""
    job_id: str = ""
    executor: str = "?"
    index: int | None = None  # an array task's index (the candidate in round 1, a survivor's position later)
    time: float | None = None
    round: int = 1  # search and select: the search round

    def __post_init__(self) -> None:
        if self.stage < 1 or not self.step or not self.job_id:
            raise ValueError(
                f"a job record needs stage >= 1, step and job_id (got {self.stage}, {self.step!r}, {self.job_id!r})"
            )


@dataclass(frozen=True)
class JobsLedger:
    """``RUN_DIR/jobs.json``: every job this run dir submitted, in order (appended atomically)."""

    jobs: tuple[JobRecord, ...] = ()


CandState = Literal["done", "failed", "preempted", "running", "not started"]


@dataclass(frozen=True)
class CandidateStatus:
    """Where one candidate stands: ``done`` (result.json), ``failed`` (failed.json, no result), ``preempted``
    (its last event; checkpointed), ``running`` (started: running, or killed without a trace), ``not started``."""

    state: CandState
    error: str | None = None  # failed: the error
    step: int | None = None  # preempted: the step it checkpointed at
    last_event: str | None = None  # running: the last event it logged (None: none yet)


def classify_candidate(
    exists: bool, result: object | None, failed: dict[str, Any] | None, events: list[dict[str, Any]]
) -> CandidateStatus:
    """The status from what was read of a candidate (``report`` reads its files tolerantly, then calls this)."""
    if result:
        return CandidateStatus("done")
    if failed:
        return CandidateStatus("failed", error=failed.get("error", "?"))
    last = events[-1] if events else None
    if last is not None and last.get("event") == "preempted":
        return CandidateStatus("preempted", step=last.get("step"))
    if exists:
        return CandidateStatus("running", last_event=last.get("event") if last else None)
    return CandidateStatus("not started")


def candidate_status(cand: Any) -> CandidateStatus:
    """The status of candidate ``cand`` (a :class:`jobs.engine.rundir.CandDir`) from its files."""
    from jobs.engine.metrics import read_events  # h5py: only when a candidate is looked at

    try:
        failed = json.loads(cand.failed_json.read_text())
    except FileNotFoundError:
        failed = None
    return classify_candidate(cand.path.exists(), cand.result_json.exists(), failed, read_events(cand.events))
