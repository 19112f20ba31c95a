"""How well a search estimator ranks, measured on the oracle's learning curves (issue #17).

The oracle (``jobs oracle --set train.val_every=N [--ema D]``) trains every candidate of a stage fully and
records its held-out loss every N steps (``curve`` in ``oracle/cand_KK/result.json``). Under
``search.trajectory=train`` a search round that ends at step b sees exactly these curves up to b, so every
estimator a round could use can be graded without another training:

- ``loss``: the held-out loss at step b (what a round scores);
- ``ema``: the held-out loss of the EMA of the weights at step b (AutoProg's momentum copies);
- ``extrapolate``: a power law ``L(s) = a + c * s^-alpha`` fitted to the curve's points up to b, evaluated at
  the stage's ``train.steps`` (the full training's length).

:func:`grade` gives, per estimator and budget, Kendall's tau against the full trainings' held-out loss and mean
zero-shot top-1, and the regret (mean zero-shot top-1) of the candidate each ranks first; :func:`halving`
replays a successive-halving search (``search.steps``, ``keep``, ``rounds``) with an estimator and reports its
pick, regret and the search overhead in candidate steps (the winner's steps are not overhead: its training
continues them). Pure functions over JSON; the eval suite only grades, it never selects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.engine.oracle import kendall_tau
from jobs.engine.rundir import RunDir, read_json

__all__ = [
    "ESTIMATORS",
    "Curve",
    "estimate",
    "fidelity_report",
    "fit_power_law",
    "format_fidelity",
    "grade",
    "halving",
    "load_curves",
]

ESTIMATORS = ("loss", "ema", "extrapolate", "refit")


@dataclass(frozen=True)
class Curve:
    """One candidate's full training as the oracle recorded it."""

    index: int
    name: str
    steps: tuple[int, ...]
    val_loss: tuple[float, ...]
    val_loss_ema: tuple[float | None, ...]
    val_loss_refit: tuple[float | None, ...]  # at the temperature re-fitted on the held-out batches
    final_val_loss: float  # after the full training, on the whole held-out split
    final_mean_acc1: float | None
    flops_per_step: float  # training FLOPs of one step (the candidates differ in size)


def load_curves(run_dir: Path, stage: int) -> list[Curve]:
    """The oracle's curves of ``stage`` (candidates without one are left out).

    Raises:
        FileNotFoundError: the stage has no oracle result with a curve (run the oracle with train.val_every).
    """
    odir = RunDir(run_dir).stage(stage).oracle
    curves = []
    for cd in odir.cands():
        res = read_json(cd.result_json)
        if not res or not res.get("curve"):
            continue
        pts = sorted(res["curve"], key=lambda p: p["step"])
        curves.append(
            Curve(
                index=int(res["index"]),
                name=str(res["name"]),
                steps=tuple(int(p["step"]) for p in pts),
                val_loss=tuple(float(p["val_loss"]) for p in pts),
                val_loss_ema=tuple(p.get("val_loss_ema") for p in pts),
                val_loss_refit=tuple(p.get("val_loss_refit") for p in pts),  # None in curves older than it
                final_val_loss=float(res["val_loss"]),
                final_mean_acc1=res.get("mean_acc1"),
                flops_per_step=float(res["train_flops"]) / max(1, int(res["steps"])),
            )
        )
    if not curves:
        raise FileNotFoundError(
            f"{odir.path}: no oracle result with a learning curve; run python -m jobs oracle --run-dir {run_dir} "
            f"--stage {stage} --set train.val_every=N (a multiple of train.log_every) [--ema 0.99]"
        )
    return sorted(curves, key=lambda c: c.index)


def fit_power_law(steps: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float] | None:
    """Least-squares ``L(s) = a + c * s^-alpha`` (alpha on a grid in [0.05, 2], a and c closed-form); None with
    fewer than 3 points."""
    if len(steps) < 3:
        return None
    best: tuple[float, float, float, float] | None = None
    for i in range(1, 41):
        alpha = 0.05 * i
        x = [s**-alpha for s in steps]
        n, sx, sy = len(x), sum(x), sum(losses)
        sxx = sum(v * v for v in x)
        sxy = sum(v * y for v, y in zip(x, losses, strict=True))
        den = n * sxx - sx * sx
        if abs(den) < 1e-18:
            continue
        c = (n * sxy - sx * sy) / den
        a = (sy - c * sx) / n
        err = sum((a + c * v - y) ** 2 for v, y in zip(x, losses, strict=True))
        if best is None or err < best[0]:
            best = (err, a, c, alpha)
    return None if best is None else best[1:]


def estimate(curve: Curve, budget: int, method: str, horizon: int) -> float | None:
    """The estimator ``method``'s value for ``curve`` seen up to step ``budget`` (lower = better)."""
    idx = [i for i, s in enumerate(curve.steps) if s <= budget]
    if not idx:
        return None
    last = idx[-1]
    if method == "loss":
        return curve.val_loss[last]
    if method == "ema":
        return curve.val_loss_ema[last]
    if method == "refit":
        return curve.val_loss_refit[last]
    if method == "extrapolate":
        pts = [(curve.steps[i], curve.val_loss[i]) for i in idx if curve.steps[i] >= budget / 4]
        fit = fit_power_law([s for s, _ in pts], [v for _, v in pts])
        if fit is None:
            return curve.val_loss[last]
        a, c, alpha = fit
        return a + c * horizon**-alpha
    raise ValueError(f"unknown estimator {method!r}; one of {', '.join(ESTIMATORS)}")


def _regret(curves: Sequence[Curve], pick: Curve) -> float | None:
    acc = [c.final_mean_acc1 for c in curves if c.final_mean_acc1 is not None]
    if not acc or pick.final_mean_acc1 is None:
        return None
    return max(acc) - pick.final_mean_acc1


def grade(curves: Sequence[Curve], budgets: Sequence[int], horizon: int) -> list[dict[str, Any]]:
    """One row per (estimator, budget): tau against the full trainings (held-out loss, mean zero-shot top-1),
    the regret of the estimator's first choice, and the steps the candidates trained to measure it."""
    rows = []
    for method in ESTIMATORS:
        for b in budgets:
            values = [estimate(c, b, method, horizon) for c in curves]
            if any(v is None or not math.isfinite(v) for v in values):
                continue
            vals = [float(v) for v in values if v is not None]
            acc = [c.final_mean_acc1 for c in curves]
            pick = curves[min(range(len(curves)), key=lambda i: vals[i])]
            rows.append(
                {
                    "estimator": method,
                    "budget": b,
                    "tau_val_loss": kendall_tau(vals, [c.final_val_loss for c in curves]),
                    "tau_mean_acc1": (
                        kendall_tau(vals, [-a for a in acc if a is not None])
                        if all(a is not None for a in acc)
                        else None
                    ),
                    "pick": pick.name,
                    "regret_mean_acc1": _regret(curves, pick),
                }
            )
    return rows


def halving(curves: Sequence[Curve], method: str, steps: int, keep: float, rounds: int, horizon: int) -> dict[str, Any]:
    """Replay successive halving on the curves: round r ranks its candidates by ``method`` at step
    ``steps / keep^(r-1)``; the best ``ceil(keep n)`` go on. Returns the pick, its regret, tau of the search's
    ranking (round reached, then the estimator) against the full trainings', and the overhead: the FLOPs of
    every step the other candidates trained, over the winner's full training."""
    alive = list(curves)
    reached: dict[int, tuple[int, float]] = {}
    trained: dict[int, int] = {}
    for r in range(1, rounds + 1):
        b = max(1, round(steps / keep ** (r - 1)))
        scored = []
        for c in alive:
            v = estimate(c, b, method, horizon)
            trained[c.index] = b
            reached[c.index] = (r, math.inf if v is None else v)
            scored.append((reached[c.index][1], c.index, c))
        scored.sort(key=lambda x: (x[0], x[1]))
        if r < rounds:
            alive = [c for _, _, c in scored[: max(1, math.ceil(len(scored) * keep - 1e-9))]]
        else:
            alive = [scored[0][2]]
    pick = alive[0]
    order = sorted(curves, key=lambda c: (-reached[c.index][0], reached[c.index][1], c.index))
    rank = {c.index: i for i, c in enumerate(order, 1)}
    search_rank = [float(rank[c.index]) for c in curves]
    overhead = sum(trained[c.index] * c.flops_per_step for c in curves if c.index != pick.index)
    acc = [c.final_mean_acc1 for c in curves]
    return {
        "estimator": method,
        "steps": steps,
        "keep": keep,
        "rounds": rounds,
        "pick": pick.name,
        "regret_mean_acc1": _regret(curves, pick),
        "tau_val_loss": kendall_tau(search_rank, [c.final_val_loss for c in curves]),
        "tau_mean_acc1": (
            kendall_tau(search_rank, [-a for a in acc if a is not None]) if all(a is not None for a in acc) else None
        ),
        "overhead": overhead / (horizon * pick.flops_per_step),
        "candidate_steps": sum(trained.values()),
    }


def fidelity_report(
    run_dir: Path, stage: int, horizon: int, budgets: Sequence[int], schedules: Sequence[tuple[int, float, int]]
) -> dict[str, Any]:
    """:func:`grade` and :func:`halving` (every estimator per schedule) of one stage, as written to
    ``oracle/fidelity.json``."""
    curves = load_curves(run_dir, stage)
    schedules = list(dict.fromkeys(schedules))  # a schedule given twice is replayed once
    return {
        "stage": stage,
        "horizon": horizon,
        "candidates": [c.name for c in curves],
        "grade": grade(curves, budgets, horizon),
        "halving": [
            halving(curves, m, s, k, r, horizon)
            for s, k, r in schedules
            for m in ESTIMATORS
            if all(estimate(c, s, m, horizon) is not None for c in curves)
        ],
    }


def format_fidelity(rep: dict[str, Any]) -> str:
    """The two tables of :func:`fidelity_report` as plain text."""

    def num(x: float | None, fmt: str = "+.2f") -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"stage {rep['stage']}: {len(rep['candidates'])} candidates, full training {rep['horizon']} steps"]
    lines.append(f"{'estimator':<12} {'budget':>6} {'tau_loss':>8} {'tau_acc':>8} {'regret':>7}  pick")
    for r in rep["grade"]:
        lines.append(
            f"{r['estimator']:<12} {r['budget']:>6} {num(r['tau_val_loss']):>8} {num(r['tau_mean_acc1']):>8} "
            f"{num(r['regret_mean_acc1'], '.3f'):>7}  {r['pick']}"
        )
    lines.append("")
    lines.append(
        f"{'halving':<24} {'estimator':<12} {'tau_loss':>8} {'tau_acc':>8} {'regret':>7} {'overhead':>8}  pick"
    )
    for h in rep["halving"]:
        sched = f"steps {h['steps']} keep {h['keep']:g} x{h['rounds']}"
        lines.append(
            f"{sched:<24} {h['estimator']:<12} {num(h['tau_val_loss']):>8} {num(h['tau_mean_acc1']):>8} "
            f"{num(h['regret_mean_acc1'], '.3f'):>7} {h['overhead']:>8.2f}  {h['pick']}"
        )
    return "\n".join(lines)
