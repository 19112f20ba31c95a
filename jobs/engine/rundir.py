"""A run directory belongs to one resolved config (issue #14: jobs own their run dir).

``RUN_DIR/config.yaml`` is the run's config (``submit`` writes it); a run dir trained stage by stage with
``train`` has it in ``stage_NN/train/config.yaml``, which the training writes once every check has passed
(a config that fails a check claims nothing). Every job that writes into a run dir (``submit``,
``submit-train``, ``train``, ``evaluate --out``) first checks that its own config is the same config
(``jobs.config.config_differences``: launch and recovery settings, and keys added to the schema since, do not count) and
otherwise refuses, listing the differing keys. Before this rule ``train`` on a finished stage with another
config said "already trained" and exited 0, ignoring the new values.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from jobs.config import ConfigError, EvalCfg, RunCfg, config_differences, load_cfg

__all__ = ["RUN_CONFIG", "check_eval_output", "check_run_dir", "run_config_path"]

RUN_CONFIG = "config.yaml"


def run_config_path(run_dir: Path) -> Path | None:
    """The file holding the run's config: RUN_DIR/config.yaml, else (runs trained stage by stage before this
    rule) the newest stage's ``train/config.yaml``; None for a new run dir."""
    run_dir = Path(run_dir)
    main = run_dir / RUN_CONFIG
    if main.is_file():
        return main
    stages = sorted(run_dir.glob(f"stage_*/train/{RUN_CONFIG}"))
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
    out: Path, eval_cfg: EvalCfg | None, data_root: Path, checkpoint: Path | None = None, weights: str = "model"
) -> None:
    """An evaluation written into a run dir (RUN_DIR/stage_NN/eval/...) is of that stage's own checkpoint
    (when the checkpoint lies in a run dir), of its trained weights, with the run's eval settings and corpus.

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
    mine = replace(run, eval=eval_cfg or run.eval, data=replace(run.data, root=Path(data_root)))
    diffs = [d for d in config_differences(run, mine) if d.startswith(("eval.", "data.root"))]
    if diffs:
        raise ConfigError(
            f"--out is inside a run dir made with other eval settings: {', '.join(diffs)} ({stored}); write to "
            "an --out outside the run dir, or evaluate with the run's settings (no --set, its data.root)"
        )
