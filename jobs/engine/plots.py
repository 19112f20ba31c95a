"""PNG plots of growth runs for ``python -m jobs report`` (matplotlib, Agg backend, no display needed).

Each function takes run dicts from :func:`jobs.engine.report.load_run` and returns the PNG bytes (the
report writes them atomically). A plot with nothing to show yet (a run that has not logged a step)
is still a valid PNG that says so, so the report's links never break. Figures are built with the
object-oriented API on a ``FigureCanvasAgg`` — no pyplot global state, no GUI backend.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["loss_vs_samples", "zeroshot_vs_compute", "arch_timeline", "search_scatter"]

_DPI = 100


def _figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_vs_samples(run: dict[str, Any], label: str) -> bytes:
    """Training loss vs cumulative samples seen (all stages), a dashed line at every growth event."""
    fig, ax = _figure()
    curve = run["loss_curve"]
    if not curve:
        _empty(ax, "no training step logged yet")
    else:
        for t in sorted({p["stage"] for p in curve}):
            pts = [p for p in curve if p["stage"] == t]
            ax.plot([p["cum_samples"] for p in pts], [p["loss"] for p in pts], marker=".", label=f"stage {t}")
        top = max(p["loss"] for p in curve)
        for g in run["growth"]:
            ax.axvline(g["cum_samples"], color="black", linestyle="--", linewidth=1)
            ax.annotate(
                f"stage {g['stage']}: {g['ops_text']}",
                (g["cum_samples"], top),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
        ax.set_xlabel("samples seen (training, cumulative over stages)")
        ax.set_ylabel("contrastive loss (train)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title(f"{label}: training loss, growth events dashed")
    return _png(fig)


def zeroshot_vs_compute(runs: list[dict[str, Any]], labels: list[str], equal_flops: float | None = None) -> bytes:
    """Zero-shot mean top-1 vs cumulative compute (FLOPs, search included), one line per run.

    ``equal_flops`` (the comparison's equal-compute point) is drawn as a dotted vertical line; the x
    axis is logarithmic when the runs' compute spans more than a factor 100.
    """
    fig, ax = _figure()
    xs: list[float] = []
    for run, label in zip(runs, labels, strict=True):
        pts = [(s["cum_flops"], s["mean_acc1"]) for s in run["stages"] if s.get("mean_acc1") is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
            xs += [x for x, _ in pts]
    if not xs:
        _empty(ax, "no evaluated stage yet")
    else:
        if min(xs) > 0 and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
        if equal_flops is not None and len(runs) > 1:
            ax.axvline(equal_flops, color="grey", linestyle=":", label="equal compute")
        ax.set_xlabel("cumulative training FLOPs (search candidates included)")
        ax.set_ylabel("zero-shot top-1, mean over tasks")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title("zero-shot accuracy vs compute")
    return _png(fig)


def arch_timeline(run: dict[str, Any], label: str) -> bytes:
    """Parameters per tower per stage as stacked bars (image, text, shared), the arch string above."""
    fig, ax = _figure()
    stages = [s for s in run["stages"] if s.get("params") is not None]
    if not stages:
        _empty(ax, "no architecture known yet")
    else:
        xs = [s["stage"] for s in stages]
        bottom = [0.0] * len(stages)
        for key, name in (("params_image", "image tower"), ("params_text", "text tower"), ("params_shared", "shared")):
            vals = [s[key] / 1e6 for s in stages]
            ax.bar(xs, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for x, b, s in zip(xs, bottom, stages, strict=True):
            ax.annotate(s["arch"].replace(" | ", "\n"), (x, b), ha="center", va="bottom", fontsize=6)
        ax.set_ylim(0, max(bottom) * 1.45)
        ax.set_xticks(xs)
        ax.set_xlabel("stage")
        ax.set_ylabel("parameters (M)")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{label}: architecture per stage")
    return _png(fig)


def search_scatter(run: dict[str, Any], label: str) -> bytes:
    """Every scored candidate: cost (params or FLOPs per growth.budget) vs score, winners starred."""
    fig, ax = _figure()
    done = [c for c in run["search"] if c["status"] == "done" and c["score"] is not None and c["cost"] is not None]
    if not done:
        _empty(ax, "no search candidate scored yet")
    else:
        for t in sorted({c["stage"] for c in done}):
            pts = [c for c in done if c["stage"] == t]
            sc = ax.scatter([c["cost"] for c in pts], [c["score"] for c in pts], label=f"stage {t}")
            win = [c for c in pts if c["winner"]]
            if win:
                ax.scatter(
                    [c["cost"] for c in win],
                    [c["score"] for c in win],
                    marker="*",
                    s=250,
                    color=sc.get_facecolor()[0],
                    edgecolors="black",
                    zorder=3,
                )
            for c in pts:
                ax.annotate(c["name"], (c["cost"], c["score"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        failed = sum(c["status"] != "done" for c in run["search"])
        ax.set_xlabel("candidate cost (growth.budget: params or FLOPs per sample)")
        ax.set_ylabel("score (lower wins)")
        ax.legend(fontsize=8, title="★ = winner" + (f"; {failed} without result" if failed else ""))
        ax.grid(alpha=0.3)
    ax.set_title(f"{label}: growth search")
    return _png(fig)
