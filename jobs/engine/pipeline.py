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
from jobs.engine.rundir import CandidateList, RoundRanking, RunDir, read_json, read_record
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
# step -> what it waits for: (dependency type, stage offset, step); stage 1 has no search/select. With
# search.rounds R > 1, search and select repeat per round (see needs()): round r's search waits for round
# r-1's select (afterok), which ranks it and names the survivors
NEEDS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "search": (("afterok", -1, "train"),),  # grows stage t-1's final.pt
    "select": (("afterany", 0, "search"),),  # failed candidates are tolerated down to search.min_successful
    "train": (("afterok", 0, "select"),),
    "evaluate": (("afterok", 0, "train"),),
}


def needs(step: str, r: int, rounds: int) -> list[tuple[str, int, str, int]]:
    """What round ``r`` of ``step`` waits for: (dependency type, stage offset, step, round)."""
    if step == "search" and r > 1:
        return [("afterok", 0, "select", r - 1)]
    if step == "train":
        return [("afterok", 0, "select", rounds)]
    return [(kind, dt, dstep, r if dt == 0 else 1) for kind, dt, dstep in NEEDS[step]]


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
    results: dict[int, dict[str, Any]]  # candidate index -> result.json (its latest round)
    selected: dict[str, Any] | None
    trained: bool
    evaluated: bool
    ranked: dict[int, RoundRanking] = field(default_factory=dict)  # round r < rounds -> its ranking

    def members(self, r: int = 1) -> list[int] | None:
        """The candidate indices that train in round ``r`` (None: not known yet)."""
        if r == 1:
            return None if self.candidates is None else list(range(self.candidates))
        ranking = self.ranked.get(r - 1)
        return None if ranking is None else list(ranking.survivors)

    def round_missing(self, r: int = 1) -> list[int]:
        """Round ``r``'s array tasks (positions among its members) whose candidate has no result of round r yet."""
        members = self.members(r)
        if members is None:
            return []
        return [i for i, k in enumerate(members) if k not in self.results or self.results[k].get("round", 1) < r]

    def done(self, step: str, r: int = 1) -> bool:
        if step == "search":
            return (
                self.stage == 1
                or self.selected is not None
                or r in self.ranked
                or (self.members(r) is not None and not self.round_missing(r))
            )
        if step == "select":
            return self.stage == 1 or self.selected is not None or r in self.ranked
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
    ranked = {}
    for r in range(1, cfg.search.rounds) if stage > 1 else ():
        ranking = read_record(RoundRanking, sd.round_json(r))
        if ranking is not None:
            ranked[r] = ranking
    return StageState(
        stage=stage,
        candidates=count,
        results=results,
        selected=read_json(sd.selected_json) if stage > 1 else None,
        trained=sd.train.final.exists() and sd.train.final_sha256.exists(),
        evaluated=sd.eval_metrics.exists(),
        ranked=ranked,
    )


@dataclass
class Action:
    """One step of one stage (one round of it, for search/select): done, already queued (ids), or to submit
    (array task indices for search: candidate indices in round 1, positions among the survivors later)."""

    stage: int
    step: str
    status: str  # done | running | submit
    indices: list[int] = field(default_factory=list)  # search: array task indices to submit
    running: list[str] = field(default_factory=list)  # ids of this run's jobs already queued for it
    after: list[tuple[str, int, str, int]] = field(default_factory=list)  # (dependency type, stage, step, round)
    note: str = ""
    round: int = 1  # search/select: the search round (1..search.rounds)

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.stage, self.step, self.round)

    @property
    def label(self) -> str:
        """``search``, or ``search round 2`` for a later round."""
        return f"{self.step} round {self.round}" if self.round > 1 else self.step


def _has_step(stage: int, step: str) -> bool:
    return stage >= 1 and not (stage == 1 and step in ("search", "select"))


def _rounds_of(cfg: RunCfg, stage: int, step: str) -> range:
    return range(1, cfg.search.rounds + 1) if stage > 1 and step in ("search", "select") else range(1, 2)


def _round_bound(cfg: RunCfg, st: StageState, r: int) -> int:
    """An upper bound of round ``r``'s array size while its members are not known yet."""
    n = st.candidates if st.candidates is not None else max_candidates(cfg.growth)
    for _ in range(1, r):
        n = cfg.search.survivors(n)
    return n


def plan_actions(
    cfg: RunCfg,
    run_dir: Path,
    stages: Sequence[int],
    active: Mapping[tuple[int, str], Sequence[Any]] | None = None,
) -> list[Action]:
    """What a submission of ``stages`` does, from the run dir and this run's queued jobs.

    Args:
        cfg: the run's config.
        run_dir: RUN_DIR.
        stages: the stages to submit.
        active: (stage, step) -> this run's job records (``JobRecord``) still queued or running
            (``jobs.cluster.Cluster.active``).

    Returns:
        One :class:`Action` per step (per round of search and select) of the stages, and per queued step of
        other stages they wait for, in DAG order.

    Raises:
        ConfigError: a stage needs an earlier one that is neither finished, queued nor submitted.
    """
    active = active or {}

    def running_of(t: int, step: str, r: int) -> list[Any]:
        return [j for j in active.get((t, step), []) if getattr(j, "round", 1) == r]

    actions: dict[tuple[int, str, int], Action] = {}
    for t in stages:
        st = stage_state(cfg, run_dir, t)
        for step in STEPS:
            if not _has_step(t, step):
                continue
            for r in _rounds_of(cfg, t, step):
                act = Action(t, step, "done", round=r)
                running = running_of(t, step, r)
                if not st.done(step, r):
                    act.running = [j.job_id for j in running]
                    if step == "search":
                        busy = {j.index for j in running}
                        members = st.members(r)
                        want = st.round_missing(r) if members is not None else list(range(_round_bound(cfg, st, r)))
                        act.indices = [k for k in want if k not in busy]
                        if members is not None:
                            act.note = f"{len(members)} candidates, {len(members) - len(st.round_missing(r))} scored"
                        elif r == 1:
                            act.note = (
                                f"candidates known once stage {t - 1} is trained: array of {len(want)} (upper bound)"
                            )
                        else:
                            act.note = (
                                f"survivors known once round {r - 1} is ranked: array of {len(want)} (upper bound)"
                            )
                        if cfg.search.rounds > 1:
                            act.note += f"; trains to step {cfg.search.round_steps(r)}"
                        act.status = "submit" if act.indices else "running"
                    else:
                        act.status = "running" if running else "submit"
                actions[act.key] = act
    for act in list(actions.values()):
        if act.status == "done":
            continue
        for kind, dt, dstep, dr in needs(act.step, act.round, cfg.search.rounds):
            s = act.stage + dt
            if not _has_step(s, dstep):
                continue
            dep = actions.get((s, dstep, dr))
            if dep is None:
                if stage_state(cfg, run_dir, s).done(dstep, dr):
                    continue
                running = running_of(s, dstep, dr)
                if not running:
                    raise ConfigError(
                        f"stage {act.stage} {act.step} needs stage {s} {dstep}, which is neither finished nor queued: "
                        f"include stage {s} in --stages"
                    )
                dep = Action(s, dstep, "running", running=[j.job_id for j in running], round=dr)
                actions[dep.key] = dep
            if dep.status != "done":
                act.after.append((kind, s, dstep, dr))
    return sorted(
        actions.values(),
        key=lambda a: (a.stage, a.round if a.step in ("search", "select") else 99, STEPS.index(a.step)),
    )


def arch_summary(spec: ArchSpec) -> str:
    """One line per architecture: ``image d2 w64 h2 mlp4 | text d2 w64 h2 mlp4 | shared d0``."""
    im, tx, sh = spec.image, spec.text, spec.shared
    shared = f"shared d{sh.depth} w{sh.width} h{sh.heads}" if sh.depth else "shared d0"
    return (
        f"image d{im.depth} w{im.width} h{im.heads} mlp{im.mlp_ratio:g} | "
        f"text d{tx.depth} w{tx.width} h{tx.heads} mlp{tx.mlp_ratio:g} | {shared}"
    )
