"""The stage DAG of a growth run and what of it is done, read from the run dir (DESIGN.md "On disk").

Per stage t the jobs are ``search`` (one array task per candidate, t > 1) → ``select`` (t > 1) →
``train`` → ``evaluate``; stage t's search needs stage t-1's ``final.pt``. What is done is never
kept in a database: it is the markers on disk, each written atomically by the job that finished —

    stage_NN/search/cand_KK/result.json   a candidate was trained and scored (or failed: status)
    stage_NN/selected.json (+ selected.pt) the winner, its table and reason; its grown weights
    stage_NN/train/final.pt (+ .sha256)    the stage's training finished
    stage_NN/eval/metrics.json             the stage was evaluated

so a resubmission skips finished work and a partial one resumes (the trainer resumes from its
checkpoints). Plain module: no submitit, no SLURM (STYLE.md R1).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.manifest import load_manifest, stage_entry
from jobs.config import RunCfg
from model.search_space import Candidate, GrowthSpace, Pruned, enumerate_candidates, scheduled_candidate
from model.spec import ArchSpec

__all__ = [
    "STEPS",
    "StageState",
    "stage_path",
    "cand_dir",
    "data_ratio",
    "previous_spec",
    "stage_candidates",
    "max_candidates",
    "stage_state",
    "read_json",
    "arch_summary",
]

STEPS = ("search", "select", "train", "evaluate")


def stage_path(run_dir: Path, stage: int) -> Path:
    """RUN_DIR/stage_NN."""
    return Path(run_dir) / f"stage_{stage:02d}"


def cand_dir(run_dir: Path, stage: int, index: int) -> Path:
    """RUN_DIR/stage_NN/search/cand_KK."""
    return stage_path(run_dir, stage) / "search" / f"cand_{index:02d}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically, or None when it is not there (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


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
    train_dir = stage_path(run_dir, stage - 1) / "train"
    if not (train_dir / "final.pt").exists() or not (train_dir / "spec.json").exists():
        return None
    return ArchSpec.from_dict(json.loads((train_dir / "spec.json").read_text()))


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
    sd = stage_path(run_dir, stage)
    count: int | None = 0
    results: dict[int, dict[str, Any]] = {}
    if stage > 1:
        cands = read_json(sd / "search" / "candidates.json")
        if cands is None:
            found = stage_candidates(cfg, run_dir, stage)
            count = None if found is None else len(found[0])
        else:
            count = len(cands["candidates"])
        for k in range(count if count is not None else max_candidates(cfg.growth)):
            res = read_json(cand_dir(run_dir, stage, k) / "result.json")
            if res is not None:
                results[k] = res
    return StageState(
        stage=stage,
        candidates=count,
        results=results,
        selected=read_json(sd / "selected.json") if stage > 1 else None,
        trained=(sd / "train" / "final.pt").exists() and (sd / "train" / "final.pt.sha256").exists(),
        evaluated=(sd / "eval" / "metrics.json").exists(),
    )


def arch_summary(spec: ArchSpec) -> str:
    """One line per architecture: ``image d2 w64 h2 mlp4 | text d2 w64 h2 mlp4 | shared d0``."""
    im, tx, sh = spec.image, spec.text, spec.shared
    shared = f"shared d{sh.depth} w{sh.width} h{sh.heads}" if sh.depth else "shared d0"
    return (
        f"image d{im.depth} w{im.width} h{im.heads} mlp{im.mlp_ratio:g} | "
        f"text d{tx.depth} w{tx.width} h{tx.heads} mlp{tx.mlp_ratio:g} | {shared}"
    )
