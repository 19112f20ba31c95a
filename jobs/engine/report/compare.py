"""Several runs side by side: :func:`compare_runs` (final metrics, compute, metrics at equal compute).

Also the runs' labels in a report (``_labels``: distinct even when run names repeat; plot and CSV rows
are named after them).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs.engine.report.load import COMPUTE_NOTE, load_run


def interpolate_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``points`` (x ascending) at ``x``; None outside their x range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


COMPARE_METRICS = ("mean_acc1", "i2t_R@1", "t2i_R@1")


def compare_runs(runs: Sequence[Path | dict[str, Any]]) -> dict[str, Any]:
    """Several runs side by side: final metrics, compute spent, and metrics at equal compute.

    Equal compute: the largest cumulative compute (FLOPs, search included) that every run reached at an
    evaluated stage, C = min over runs of their last evaluated stage's ``cum_flops``; each run's
    metric at C is the linear interpolation between its per-stage (cum_flops, metric) points (None
    when C is below the run's first evaluated stage: no extrapolation).

    Args:
        runs: run dirs, or dicts from :func:`load_run`.

    Returns:
        ``{"runs": [row per run], "tasks": [...], "equal_compute": {"flops", "method", "rows"}}``.
    """
    loaded = [r if isinstance(r, dict) else load_run(Path(r)) for r in runs]
    names = [r["name"] for r in loaded]
    rows, tasks = [], sorted({t for r in loaded for s in r["stages"] for t in s.get("acc1", {})})
    for r in loaded:
        label = r["name"] if names.count(r["name"]) == 1 else f"{r['name']} ({Path(r['run_dir']).name})"
        done = [s for s in r["stages"] if s["status"] == "evaluated"]
        last = done[-1] if done else {}
        started = [s for s in r["stages"] if s.get("params") is not None]
        final = started[-1] if started else {}
        rows.append(
            {
                "run": label,
                "run_dir": r["run_dir"],
                "seed": r.get("seed"),
                "stages_done": r["stages_done"],
                "stages_planned": r["stages_planned"],
                "arch": final.get("arch"),
                "params": final.get("params"),
                "cum_flops": max((s.get("cum_flops") or 0 for s in r["stages"]), default=0),
                "compute_hours": max((s.get("cum_compute_hours") or 0.0 for s in r["stages"]), default=0.0),
                "compute_unit": r["compute"]["unit"],
                "evaluated_stage": last.get("stage"),
                "acc1": dict(last.get("acc1", {})),
                **{m: last.get(m) for m in COMPARE_METRICS},
                "points": {m: [(s["cum_flops"], s[m]) for s in done if s.get(m) is not None] for m in COMPARE_METRICS},
            }
        )
    reach = [max(x for x, _ in row["points"]["mean_acc1"]) for row in rows if row["points"]["mean_acc1"]]
    c = min(reach) if len(reach) == len(rows) and rows else None
    eq_rows = []
    for row in rows:
        vals = {m: interpolate_at(row["points"][m], c) if c is not None else None for m in COMPARE_METRICS}
        first = min((x for x, _ in row["points"]["mean_acc1"]), default=None)
        note = ""
        if c is None:
            note = "no run-wide equal compute (a run has no evaluated stage)"
        elif first is not None and c < first:
            note = f"its first evaluated stage is at {first:.3g} FLOPs > {c:.3g}: not extrapolated"
        eq_rows.append({"run": row["run"], **vals, "note": note})
    return {
        "runs": rows,
        "tasks": tasks,
        "equal_compute": {
            "flops": c,
            "method": "each run's metric linearly interpolated over its per-stage (cumulative FLOPs, metric) points "
            "at the largest cumulative compute every run reached at an evaluated stage; " + COMPUTE_NOTE,
            "rows": eq_rows,
        },
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """One distinct label per run (plot files are named after them): the config name, then the run dir's
    name where names repeat, then an index where even that repeats."""
    names = [r["name"] for r in runs]
    labels = [r["name"] if names.count(r["name"]) == 1 else f"{r['name']} ({Path(r['run_dir']).name})" for r in runs]
    slugs = [_slug(x) for x in labels]
    return [f"{x} #{i + 1}" if slugs.count(_slug(x)) > 1 else x for i, x in enumerate(labels)]
