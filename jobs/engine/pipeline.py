"""The stage DAG of a growth run and what of it is done, read from the run dir (DESIGN.md "On disk").

Per stage t the jobs are ``search`` (one array task per candidate, t > 1) → ``select`` (t > 1) →
``train`` → ``evaluate``; stage t's search needs stage t-1's ``final.pt``. What is done is never
kept in a database: it is the markers on disk, each written atomically by the job that finished —

    stage_NN/search/cand_KK/result.json   a candidate was trained and scored (or failed: status)
    stage_NN/selected.json (+ selected.pt) the winner, its table and reason; its grown weights
    stage_NN/train/final.pt (+ .sha256)    the stage's training finished
    stage_NN/eval/metrics.json             the stage was evaluated

so a resubmission skips finished work and a partial one resumes (the trainer resumes from its
checkpoints). :func:`plan_actions` turns these markers and the run's queued jobs into what a
submission does per step (done / already queued / submit) and on which steps each waits (``NEEDS``).
Plain module: no submitit, no SLURM (STYLE.md R1); ``jobs.submit`` submits the plan.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.manifest import load_manifest, stage_entry
from jobs.config import ConfigError, RunCfg
from jobs.engine.rundir import CandidateList, RunDir, read_json, read_record
from model.search_space import Candidate, GrowthSpace, Pruned, enumerate_candidates, scheduled_candidate
from model.spec import ArchSpec

__all__ = [
    "STEPS",
    "NEEDS",
    "StageState",
    "Action",
    "plan_actions",
    "data_ratio",
    "previous_spec",
    "stage_candidates",
    "max_candidates",
    "stage_state",
    "arch_summary",
]

STEPS = ("search", "select", "train", "evaluate")
# step -> what it waits for: (dependency type, stage offset, step); stage 1 has no search/select
NEEDS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "search": (("afterok", -1, "train"),),  # grows stage t-1's final.pt
    "select": (("afterany", 0, "search"),),  # failed candidates are tolerated down to search.min_successful
    "train": (("afterok", 0, "select"),),
    "evaluate": (("afterok", 0, "train"),),
}


def data_ratio(data_root: Path, stage: int) -> float:
    """|D_<=t| / |D_<=t-1| from DATA_ROOT/manifest.json (1.0 for stage 1).

    Raises:
        ValueError: the stage (or an earlier one) is missing from the manifest.
    """
    if stage <= 1:
        return 1.0
    manifest = load_manifest(data_root, missing_ok=False)
    counts = []
    for s in range(1, stage + 1):
        entry = stage_entry(manifest, s)
        if entry is None:
            raise ValueError(f"stage {s} is not in {data_root}/manifest.json; ingest it or lower data.stages")
        counts.append(int(entry["count"]))
    before = sum(counts[:-1])
    if before <= 0:
        raise ValueError(f"stages 1..{stage - 1} of {data_root} hold no pairs")
    return sum(counts) / before


def previous_spec(run_dir: Path, stage: int) -> ArchSpec | None:
    """A_{t-1}: the ArchSpec trained at stage t-1, once its final.pt exists (None before)."""
    train = RunDir(run_dir).stage(stage - 1).train
    if not train.final.exists() or not train.spec_json.exists():
        return None
    return ArchSpec.from_dict(json.loads(train.spec_json.read_text()))


def stage_candidates(cfg: RunCfg, run_dir: Path, stage: int) -> tuple[list[Candidate], list[Pruned]] | None:
    """The growth space of stage t > 1 (deterministic), or None while stage t-1 is not trained.

    With a fixed schedule (``growth.schedule``) the space is the one scheduled candidate.
    """
    prev = previous_spec(run_dir, stage)
    if prev is None:
        return None
    ratio = data_ratio(cfg.data.root, stage)
    if cfg.growth.schedule:
        return [scheduled_candidate(prev, stage, ratio, cfg.growth)], []
    return enumerate_candidates(prev, ratio, cfg.growth)


def max_candidates(space: GrowthSpace) -> int:
    """An upper bound of a stage's candidate count, known before the previous stage has finished.

    The array of a stage whose predecessor is still running is submitted with this many tasks; a
    task whose index is beyond the stage's actual candidate list finds nothing to do and exits 0.
    """
    if space.schedule:
        return 1
    combos = sum(1 for n in range(1, space.max_ops + 1) for _ in itertools.combinations(space.axes, n))
    return min(space.max_candidates, 1 + combos)


@dataclass(frozen=True)
class StageState:
    """What of one stage is on disk."""

    stage: int
    candidates: int | None  # number of candidates (None: stage t-1 not trained yet; 0 for stage 1)
    results: dict[int, dict[str, Any]]  # candidate index -> result.json
    selected: dict[str, Any] | None
    trained: bool
    evaluated: bool

    @property
    def search_missing(self) -> list[int]:
        """Candidate indices without a result.json (all of the bound when the count is unknown)."""
        if self.candidates is None:
            return []
        return [k for k in range(self.candidates) if k not in self.results]

    def done(self, step: str) -> bool:
        if step == "search":
            return (
                self.stage == 1
                or self.selected is not None
                or (self.candidates is not None and not self.search_missing)
            )
        if step == "select":
            return self.stage == 1 or self.selected is not None
        if step == "train":
            return self.trained
        return self.evaluated


def stage_state(cfg: RunCfg, run_dir: Path, stage: int) -> StageState:
    """Read a stage's markers (cheap: JSON files and existence checks)."""
    sd = RunDir(run_dir).stage(stage)
    count: int | None = 0
    results: dict[int, dict[str, Any]] = {}
    if stage > 1:
        cands = read_record(CandidateList, sd.candidates_json)
        if cands is None:
            found = stage_candidates(cfg, run_dir, stage)
            count = None if found is None else len(found[0])
        else:
            count = len(cands.candidates)
        for k in range(count if count is not None else max_candidates(cfg.growth)):
            res = read_json(sd.cand(k).result_json)
            if res is not None:
                results[k] = res
    return StageState(
        stage=stage,
        candidates=count,
        results=results,
        selected=read_json(sd.selected_json) if stage > 1 else None,
        trained=sd.train.final.exists() and sd.train.final_sha256.exists(),
        evaluated=sd.eval_metrics.exists(),
    )


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


def _has_step(stage: int, step: str) -> bool:
    return stage >= 1 and not (stage == 1 and step in ("search", "select"))


def plan_actions(
    cfg: RunCfg,
    run_dir: Path,
    stages: Sequence[int],
    active: Mapping[tuple[int, str], Sequence[Mapping[str, Any]]] | None = None,
) -> list[Action]:
    """What a submission of ``stages`` does, from the run dir and this run's queued jobs.

    Args:
        cfg: the run's config.
        run_dir: RUN_DIR.
        stages: the stages to submit.
        active: (stage, step) -> this run's job records still queued or running (``jobs.cluster.active_jobs``).

    Returns:
        One :class:`Action` per step of the stages (and per queued step of other stages they wait for),
        in DAG order.

    Raises:
        ConfigError: a stage needs an earlier one that is neither finished, queued nor submitted.
    """
    active = active or {}
    actions: dict[tuple[int, str], Action] = {}
    for t in stages:
        st = stage_state(cfg, run_dir, t)
        for step in STEPS:
            if not _has_step(t, step):
                continue
            act = Action(t, step, "done")
            running = active.get((t, step), [])
            if not st.done(step):
                act.running = [r.job_id for r in running]
                if step == "search":
                    busy = {r.index for r in running}
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
    for (t, step), act in list(actions.items()):
        if act.status == "done":
            continue
        for kind, dt, dstep in NEEDS[step]:
            s = t + dt
            if not _has_step(s, dstep):
                continue
            dep = actions.get((s, dstep))
            if dep is None:
                if stage_state(cfg, run_dir, s).done(dstep):
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


def arch_summary(spec: ArchSpec) -> str:
    """One line per architecture: ``image d2 w64 h2 mlp4 | text d2 w64 h2 mlp4 | shared d0``."""
    im, tx, sh = spec.image, spec.text, spec.shared
    shared = f"shared d{sh.depth} w{sh.width} h{sh.heads}" if sh.depth else "shared d0"
    return (
        f"image d{im.depth} w{im.width} h{im.heads} mlp{im.mlp_ratio:g} | "
        f"text d{tx.depth} w{tx.width} h{tx.heads} mlp{tx.mlp_ratio:g} | {shared}"
    )
