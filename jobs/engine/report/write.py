"""The report's files and the pipeline's text summary: :func:`write_report`, :func:`format_report`.

:func:`write_report` loads the runs, draws the plots of :mod:`jobs.engine.plots` and writes md, html,
json or csv (:func:`csv_tables`: one row per run x stage, candidate, growth event, kernel report, oracle
candidate and, for several runs, per run). :func:`format_report` is the per-stage plain-text summary
that ``submit`` prints when it finishes (``python -m jobs report RUN_DIR``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_bytes, atomic_write_text
from jobs.engine.oracle import format_oracle
from jobs.engine.report.blocks import _num, render_html, render_markdown
from jobs.engine.report.compare import COMPARE_METRICS, _labels, _slug, compare_runs
from jobs.engine.report.load import REPORT_FORMAT, load_run
from jobs.engine.report.read import ReportError
from jobs.engine.report.sections import report_blocks

FORMATS = ("md", "html", "json", "csv")


def plot_files(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Plot key → file name under the report's ``plots/`` (``<run>_loss.png`` ... and the shared ones)."""
    files = {"zeroshot_vs_compute": "zeroshot_vs_compute.png"}
    for label in _labels(runs):
        for kind in ("loss", "arch", "search"):
            files[f"{label}/{kind}"] = f"{_slug(label)}_{kind}.png"
    return files


def _flat(row: dict[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """A row with nested dicts flattened to ``key/subkey`` columns (CSV)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            for k2, v2 in _flat(v).items():
                out[f"{k}/{k2}"] = v2
        elif isinstance(v, list):
            out[k] = json.dumps(v)
        else:
            out[k] = v
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def csv_tables(runs: list[dict[str, Any]]) -> dict[str, str]:
    """File name → CSV text: stages, search, growth, kernels (one row per run x stage/candidate/...), compare."""
    labels = _labels(runs)
    stages, search, growth, kernels = [], [], [], []
    for run, label in zip(runs, labels, strict=True):
        stages += [{"run": label, **_flat(s, skip=("spec",))} for s in run["stages"]]
        search += [{"run": label, **_flat(c)} for c in run["search"]]
        growth += [{"run": label, **_flat(g, skip=("ops",))} for g in run["growth"]]
        kernels += [{"run": label, "stage": int(t), **k} for t, k in run["kernels"].items()]
    out = {
        "stages.csv": _csv(stages),
        "search.csv": _csv(search),
        "growth.csv": _csv(growth),
        "kernels.csv": _csv(kernels),
    }
    oracle = [
        {
            "run": label,
            "stage": o["stage"],
            **_flat(r, skip=("acc1",)),
            **{f"tau_{k}": v for k, v in o["kendall_tau"].items()},
        }
        for run, label in zip(runs, labels, strict=True)
        for o in run.get("oracle", [])
        for r in o["candidates"]
    ]
    if oracle:
        out["oracle.csv"] = _csv(oracle)
    if len(runs) > 1:
        cmp = compare_runs(runs)
        eq = {r["run"]: r for r in cmp["equal_compute"]["rows"]}
        rows = []
        for r in cmp["runs"]:
            row = _flat(r, skip=("points",))
            row.update({f"{m}@equal_compute": eq[r["run"]][m] for m in COMPARE_METRICS})
            row["equal_compute_flops"] = cmp["equal_compute"]["flops"]
            rows.append(row)
        out["compare.csv"] = _csv(rows)
    return out


def write_report(run_dirs: Sequence[Path], out: Path, fmt: str = "md") -> list[Path]:
    """Load the runs, draw the plots and write the report in ``fmt`` under ``out``; returns the files written.

    ``md``: report.md + plots/*.png; ``html``: report.html with the plots embedded (and plots/*.png);
    ``json``: report.json (every run's :func:`load_run` dict and, for several runs, the comparison);
    ``csv``: stages.csv, search.csv, growth.csv, kernels.csv (+ compare.csv for several runs).
    Every file is written atomically.

    Raises:
        ReportError: a path is not a run dir, or ``fmt`` is unknown.
    """
    from jobs.engine import plots as plotting

    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; pick one of {', '.join(FORMATS)}")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, data: str | bytes) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (atomic_write_bytes if isinstance(data, bytes) else atomic_write_text)(path, data)
        written.append(path)

    if fmt == "json":
        doc: dict[str, Any] = {"format": REPORT_FORMAT, "version": 1, "runs": runs}
        if len(runs) > 1:
            doc["comparison"] = compare_runs(runs)
        put("report.json", json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        return written
    if fmt == "csv":
        for name, text in csv_tables(runs).items():
            put(name, text)
        return written
    files = plot_files(runs)
    images: dict[str, bytes] = {}
    labels = _labels(runs)
    equal = compare_runs(runs)["equal_compute"]["flops"] if len(runs) > 1 else None
    images[files["zeroshot_vs_compute"]] = plotting.zeroshot_vs_compute(runs, labels, equal)
    for run, label in zip(runs, labels, strict=True):
        images[files[f"{label}/loss"]] = plotting.loss_vs_samples(run, label)
        images[files[f"{label}/arch"]] = plotting.arch_timeline(run, label)
        images[files[f"{label}/search"]] = plotting.search_scatter(run, label)
    for name, data in images.items():
        put(f"plots/{name}", data)
    blocks = report_blocks(runs, files)
    if fmt == "md":
        put("report.md", render_markdown(blocks))
    else:
        put("report.html", render_html(blocks, {f"plots/{k}": v for k, v in images.items()}))
    return written


def stage_rows(run_dir: Path, stages: int | None = None) -> list[dict[str, Any]]:
    """One dict per stage that has started (up to ``stages``): the per-stage rows of :func:`load_run`.

    Keys include ``stage, chosen, arch, params, search_flops, train_flops, cum_flops, acc1 (task →
    top-1), mean_acc1, i2t_R@1, t2i_R@1`` (R@1 averaged over the retrieval tasks).
    """
    rows = [s for s in load_run(run_dir)["stages"] if s["status"] not in ("not started", "missing")]
    return [r for r in rows if stages is None or r["stage"] <= stages]


def format_report(run_dir: Path, stages: int | None = None) -> str:
    """The per-stage summary as plain text (what ``submit`` prints at the end and ``report RUN_DIR`` shows)."""
    run = load_run(run_dir)
    rows = [s for s in run["stages"] if s["status"] not in ("not started", "missing")]
    rows = [r for r in rows if stages is None or r["stage"] <= stages]
    lines = [f"warning: {w}" for w in run["warnings"]]
    if not rows:
        return "\n".join(lines + [f"{run_dir}: no stage has started yet"])
    for r in rows:
        lines.append(
            f"stage {r['stage']}: chosen={r['chosen'] or '?'}  arch: {r['arch'] or '?'}  params "
            f"{_num(r['params'], 'params')}  FLOPs spent: search {r['search_flops']:.3g} + train "
            f"{r['train_flops']:.3g}, cumulative {r['cum_flops']:.3g}"
            + ("" if r["status"] == "evaluated" else f"  [{r['status']}]")
            + ("  [made by the autopilot]" if r.get("autopilot") else "")
        )
    tasks = sorted({name for r in rows for name in r["acc1"]})
    head = ["stage", "chosen", "params", "rounds", "search/train"] + tasks + ["mean_acc1", "i2t_R@1", "t2i_R@1"]
    table = [head]
    for r in rows:
        rounds = "-" if r["search_rounds"] is None else f"{r['search_rounds']}{'+' if r['continues'] else ''}"
        table.append(
            [str(r["stage"]), r["chosen"] or "?", _num(r["params"], "params"), rounds, _num(r["search_overhead"], "f2")]
            + [_num(r["acc1"].get(t), "f3") for t in tasks]
            + [_num(r["mean_acc1"], "f3"), _num(r["i2t_R@1"], "f3"), _num(r["t2i_R@1"], "f3")]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if any(r["search_rounds"] for r in rows):
        lines.append(
            "rounds: search rounds (+: the stage's training continued the winner's search state); search/train: "
            "FLOPs of the search's other candidates over the stage's training FLOPs"
        )
    for o in run["oracle"]:
        lines += ["", format_oracle(o)]
    return "\n".join(lines)
