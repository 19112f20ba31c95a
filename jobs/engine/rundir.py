"""The run directory as a typed value (issue #16), and the rule that it belongs to one resolved config (issue #14).

Layout (jobs/README.md): :class:`RunDir` → :class:`StageDir` (``stage_NN/``) → :class:`CandDir`
(``search/cand_KK/``, and ``oracle/cand_KK/`` under :class:`OracleDir`) and :class:`TrainDir`
(``train/``). Every reader and writer of a run dir names its files through these classes, never by
f-string; the typed records of its JSON files are in :mod:`jobs.engine.records`.

Config ownership: a run directory belongs to one resolved config.

``RUN_DIR/config.yaml`` is the run's config (``submit`` writes it); a run dir trained stage by stage with
``train`` has it in ``stage_NN/train/config.yaml``, which the training writes once every check has passed
(a config that fails a check claims nothing). Every job that writes into a run dir (``submit``,
``submit-train``, ``train``, ``evaluate --out``) first checks that its own config is the same config
(``jobs.config.config_differences``: launch and recovery settings, and keys added to the schema since, do not count) and
otherwise refuses, listing the differing keys. Before this rule ``train`` on a finished stage with another
config said "already trained" and exited 0, ignoring the new values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from data_tools.tokenizer import TOKENIZER_NAME
from jobs.config import ConfigError, EvalCfg, RunCfg, config_differences, load_cfg
from jobs.engine.records import (  # the typed records of the files below (re-exported: one module for a run dir)
    CandidateList,
    CandidateResult,
    CandidateStatus,
    EvalMetrics,
    FailedRecord,
    JobRecord,
    JobsLedger,
    OracleSummary,
    RoundRanking,
    Selection,
    candidate_status,
    read_record,
)

__all__ = [
    "EVENTS",
    "METRICS_H5",
    "RUN_CONFIG",
    "AutopilotDir",
    "CandDir",
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
    "candidate_status",
    "read_record",
    "OracleDir",
    "RunDir",
    "StageDir",
    "TrainDir",
    "check_eval_output",
    "check_run_dir",
    "read_json",
    "run_config_path",
]

RUN_CONFIG = "config.yaml"
EVENTS = "events.jsonl"  # a training's or search candidate's event log (jobs.engine.metrics.MetricsLog)
METRICS_H5 = "metrics.h5"  # its step series
_STAGE_DIR = re.compile(r"^stage_(\d{2,})$")
_CAND_DIR = re.compile(r"^cand_(\d{2,})$")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically, or None when it is not there (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def _numbered(parent: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """The sub-directories of ``parent`` named like ``pattern`` (one number group), sorted by number."""
    found = []
    for p in parent.iterdir() if parent.is_dir() else ():
        m = pattern.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass(frozen=True)
class CandDir:
    """One candidate: RUN_DIR/stage_NN/search/cand_KK (a search task) or stage_NN/oracle/cand_KK (its full training)."""

    path: Path
    index: int

    @property
    def result_json(self) -> Path:
        return self.path / "result.json"  # written last: the candidate is done

    @property
    def failed_json(self) -> Path:
        return self.path / "failed.json"  # the last attempt failed (removed once a later one succeeds)

    @property
    def spec_json(self) -> Path:
        return self.path / "spec.json"

    @property
    def growth_json(self) -> Path:
        return self.path / "growth.json"

    @property
    def grown(self) -> Path:
        return self.path / "grown.pt"  # the PIM-grown start (search only)

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    @property
    def work(self) -> Path:
        return self.path / "work"  # the candidate's training: a run dir of its own

    def work_train(self, stage: int) -> TrainDir:
        """The candidate's training of ``stage`` (``work/stage_NN/train``)."""
        return RunDir(self.work).stage(stage).train


@dataclass(frozen=True)
class TrainDir:
    """A stage's training: RUN_DIR/stage_NN/train."""

    path: Path

    @property
    def final(self) -> Path:
        return self.path / "final.pt"

    @property
    def final_sha256(self) -> Path:
        return self.path / "final.pt.sha256"  # written after final.pt: the training finished and verifies

    @property
    def spec_json(self) -> Path:
        return self.path / "spec.json"

    @property
    def config_yaml(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    @property
    def metrics_h5(self) -> Path:
        return self.path / METRICS_H5

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


@dataclass(frozen=True)
class OracleDir:
    """The search's grading: RUN_DIR/stage_NN/oracle (jobs/README.md "Grading the search")."""

    path: Path

    def cand(self, index: int) -> CandDir:
        return CandDir(self.path / f"cand_{index:02d}", index)

    def cands(self) -> list[CandDir]:
        """The oracle candidates present on disk, by index."""
        return [CandDir(p, k) for k, p in _numbered(self.path, _CAND_DIR)]

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"


@dataclass(frozen=True)
class StageDir:
    """One stage: RUN_DIR/stage_NN."""

    path: Path
    stage: int

    @property
    def search(self) -> Path:
        return self.path / "search"

    @property
    def candidates_json(self) -> Path:
        return self.search / "candidates.json"

    def cand(self, index: int) -> CandDir:
        return CandDir(self.search / f"cand_{index:02d}", index)

    def round_json(self, r: int) -> Path:
        return self.search / f"round_{r:02d}.json"  # the ranking after search round r < search.rounds

    def cands(self) -> list[CandDir]:
        """The candidate directories present on disk, by index."""
        return [CandDir(p, k) for k, p in _numbered(self.search, _CAND_DIR)]

    @property
    def selected_json(self) -> Path:
        return self.path / "selected.json"

    @property
    def selected_pt(self) -> Path:
        return self.path / "selected.pt"  # the winner's grown weights or search state: the stage's ``--init``

    @property
    def train(self) -> TrainDir:
        return TrainDir(self.path / "train")

    @property
    def final(self) -> Path:
        return self.train.final

    @property
    def eval_metrics(self) -> Path:
        return self.path / "eval" / "metrics.json"

    @property
    def oracle(self) -> OracleDir:
        return OracleDir(self.path / "oracle")


@dataclass(frozen=True)
class AutopilotDir:
    """RUN_DIR/autopilot/: what ``jobs autopilot`` remembers (jobs/engine/autopilot.py)."""

    path: Path

    @property
    def state_json(self) -> Path:
        """Crawls seen and ingested (by content), stages made, the stage in flight, pause: written atomically."""
        return self.path / "state.json"

    @property
    def events_jsonl(self) -> Path:
        """Every decision, one JSON object a line."""
        return self.path / "events.jsonl"

    @property
    def polls_json(self) -> Path:
        """The recurring SLURM poll jobs (the newest few; ``jobs cancel`` and ``--stop`` cancel them)."""
        return self.path / "polls.json"

    @property
    def stop_flag(self) -> Path:
        """Present after ``jobs autopilot --stop``: no poll is scheduled any more (``jobs autopilot`` removes it)."""
        return self.path / "stopped"

    def staging(self, crawl_id: str) -> Path:
        """The crawl's pairs, ingested on their own (a data root of one stage) until they join a stage."""
        return self.path / "staging" / crawl_id

    def batch(self, stage: int) -> Path:
        """The staged shards that become DATA_ROOT's stage ``stage`` (links), the input of its ingest."""
        return self.path / "batches" / f"stage_{stage:02d}"


@dataclass(frozen=True)
class RunDir:
    """RUN_DIR: ``RunDir(path).stage(2).cand(3).result_json``."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_yaml(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def jobs_json(self) -> Path:
        return self.path / "jobs.json"

    @property
    def plan_json(self) -> Path:
        return self.path / "plan.json"

    @property
    def tokenizer_json(self) -> Path:
        """The tokenizer the run trains with (jobs/engine/tokens.py: copied once, its hash in every checkpoint)."""
        return self.path / TOKENIZER_NAME

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    @property
    def autopilot(self) -> AutopilotDir:
        return AutopilotDir(self.path / "autopilot")

    def stage(self, stage: int) -> StageDir:
        return StageDir(self.path / f"stage_{stage:02d}", stage)

    def stages(self) -> dict[int, StageDir]:
        """The stage directories present on disk (``stage_NN/``), by stage."""
        return {t: StageDir(p, t) for t, p in _numbered(self.path, _STAGE_DIR)}

    def looks_like_run(self) -> bool:
        """A directory holding a run's markers (config.yaml, plan.json, jobs.json) or stage directories."""
        markers = (self.config_yaml, self.plan_json, self.jobs_json)
        return self.path.is_dir() and (any(m.exists() for m in markers) or bool(self.stages()))


def run_config_path(run_dir: Path) -> Path | None:
    """The file holding the run's config: RUN_DIR/config.yaml, else (runs trained stage by stage before this
    rule) the newest stage's ``train/config.yaml``; None for a new run dir."""
    rd = RunDir(run_dir)
    if rd.config_yaml.is_file():
        return rd.config_yaml
    stages = [s.train.config_yaml for s in rd.stages().values() if s.train.config_yaml.exists()]
    return stages[-1] if stages else None


def check_run_dir(run_dir: Path, cfg: RunCfg) -> Path | None:
    """Refuse a run dir that is not a directory or was made with another config; return its config file.

    Raises:
        ConfigError: ``run_dir`` is a file, or its config differs from ``cfg`` (the keys are listed).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir is not a directory ({run_dir}); pass a directory, e.g. runs/<name>")
    stored = run_config_path(run_dir)
    if stored is None:
        return None
    try:
        old = load_cfg(stored)
    except ConfigError as exc:
        raise ConfigError(
            f"the run dir's config no longer loads: {exc} ({stored}); use a new --run-dir for this config"
        ) from None
    diffs = config_differences(old, cfg)
    if diffs:
        shown = ", ".join(diffs[:12]) + (f", and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"the run dir was made with another config: {shown} ({stored}); use a new --run-dir, or run with the "
            f"run's own config: --config {stored}"
        )
    return stored


def _stage_dir_of(path: Path) -> Path | None:
    """The ``stage_NN`` directory ``path`` lies in (RUN_DIR/stage_NN/...), or None."""
    return next((p for p in Path(path).resolve().parents if p.name.startswith("stage_")), None)


def check_eval_output(
    out: Path,
    eval_cfg: EvalCfg | None,
    data_root: Path,
    checkpoint: Path | None = None,
    weights: str = "model",
    task_dirs: Sequence[Path] = (),
) -> None:
    """An evaluation written into a run dir (RUN_DIR/stage_NN/eval/...) is of that stage's own checkpoint
    (when the checkpoint lies in a run dir), of its trained weights, with the run's eval settings and corpus
    (``task_dirs``: the ``--task-dir`` folders added to the eval settings' ``task_dirs``).

    Raises:
        ConfigError: another run's or stage's checkpoint, ``--weights ema``, or ``--set eval.*`` /
            ``--data-root`` other than the run's config (the keys are listed).
    """
    out = Path(out).resolve()
    if len(out.parents) < 3 or not out.parents[1].name.startswith("stage_"):
        return  # not inside a run dir: any settings
    source = _stage_dir_of(checkpoint) if checkpoint is not None else None
    if source is not None and source != out.parents[1]:
        raise ConfigError(
            f"--checkpoint is of another run or stage ({source}) than --out ({out.parents[1]}); write to an --out "
            "outside the run dir, or evaluate that stage's own checkpoint"
        )
    if weights != "model":
        raise ConfigError(
            f"--weights {weights} into a run dir ({out}): a stage's evaluation is of its trained weights; write "
            "the EMA's evaluation to an --out outside the run dir"
        )
    stored = run_config_path(out.parents[2])
    if stored is None:
        return
    try:
        run = load_cfg(stored)
    except ConfigError:
        return  # an old run dir whose config no longer loads: nothing to compare with
    mine_eval = eval_cfg or run.eval
    mine_eval = replace(mine_eval, task_dirs=(*mine_eval.task_dirs, *map(Path, task_dirs)))
    mine = replace(run, eval=mine_eval, data=replace(run.data, root=Path(data_root)))
    diffs = [d for d in config_differences(run, mine) if d.startswith(("eval.", "data.root"))]
    if diffs:
        raise ConfigError(
            f"--out is inside a run dir made with other eval settings: {', '.join(diffs)} ({stored}); write to "
            "an --out outside the run dir, or evaluate with the run's settings (no --set, its data.root)"
        )
