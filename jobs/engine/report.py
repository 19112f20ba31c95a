"""Offline analysis of growth runs (``python -m jobs report``): tables and plots read from run dirs only.

Nothing here runs a model: every number comes from the files the jobs wrote (DESIGN.md "On disk") —
``config.yaml``, ``stage_NN/train/{spec.json, events.jsonl}``, ``stage_NN/eval/metrics.json``,
``stage_NN/search/{candidates.json, cand_KK/{result.json, failed.json, growth.json, events.jsonl,
work/stage_NN/train/events.jsonl}}`` and ``stage_NN/selected.json`` — plus ``model.spec.ArchSpec``
for parameter and FLOP counts. Finished, running and failed runs all load: a cut-off last JSONL line
(a job killed mid-write, or writing now), a missing stage, a missing evaluation or a failed
candidate become entries in ``warnings`` and empty cells, never an exception.

:func:`load_run` gives one run as a JSON-ready dict (the ``json`` format writes it as it is);
:func:`compare_runs` puts several side by side, including their metrics *at equal compute*;
:func:`write_report` renders md/html/json/csv plus the PNG plots of :mod:`jobs.engine.plots`.
Definitions (also printed in every report):

* compute: cumulative training FLOPs, ``ArchSpec.flops_per_sample()`` (forward + backward estimate)
  x samples trained, search candidates included, evaluation excluded;
* wall time: per training, the sum over its job segments (start or resume to its last logged
  event); per search candidate ``result.json``'s ``seconds`` (failed: first event to ``failed.json``);
  evaluation from the trainer's ``eval`` event when it evaluated in-process (otherwise not logged);
* estimated GPU-hours: wall time x GPUs requested (training ``cluster.nodes x gpus_per_node``, one
  per search or evaluation task); with ``gpus_per_node: 0`` CPU core-hours instead (wall time x
  ``cpus_per_task`` per task), and the column says so;
* validation loss: the InfoNCE loss on stage t's held-out split of the search winner, after its short
  search training (``result.json``; stage 1 has no search, so none) — the only held-out loss logged;
* loss just before / after growth: the last logged training loss of stage t-1 and the first of stage t
  (and of the winner's search training).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from data_tools.atomic import atomic_write_bytes, atomic_write_text
from jobs.engine.metrics import read_events
from jobs.engine.oracle import format_oracle
from jobs.engine.pipeline import arch_summary, stage_path
from model.spec import ArchSpec, block_params

__all__ = [
    "FORMATS",
    "ReportError",
    "load_run",
    "tower_params",
    "compare_runs",
    "interpolate_at",
    "stage_rows",
    "format_report",
    "report_blocks",
    "render_markdown",
    "render_html",
    "markdown_table",
    "write_report",
]

logger = logging.getLogger(__name__)

FORMATS = ("md", "html", "json", "csv")
REPORT_FORMAT = "growclip-report"
_STAGE_DIR = re.compile(r"^stage_(\d{2,})$")
_CAND_DIR = re.compile(r"^cand_(\d{2,})$")

COMPUTE_NOTE = (
    "compute = cumulative training FLOPs (ArchSpec.flops_per_sample(), forward+backward estimate, x samples "
    "trained; search candidates included, evaluation excluded)"
)
VAL_LOSS_NOTE = (
    "val_loss = InfoNCE on stage t's held-out split of the search winner after its short search training "
    "(result.json); stage 1 has no search"
)


class ReportError(ValueError):
    """A path given to the report is not a run dir (the message names the path and the fix)."""


# ------------------------------------------------------------------------------------------- reading
def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _json(path: Path, run_dir: Path, warnings: list[str]) -> dict[str, Any] | None:
    """A JSON marker, or None when absent; an unreadable one is a warning, not an error."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        warnings.append(f"{_rel(path, run_dir)}: unreadable ({type(exc).__name__}: {exc}); ignored")
        return None
    return data if isinstance(data, dict) else None


def _events(path: Path, run_dir: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Records of an events.jsonl; unreadable lines (a cut-off last line) are skipped and reported."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = [r for r in read_events(path) if isinstance(r, dict)]
    if len(records) < len(lines):
        last_bad = True
        try:
            json.loads(lines[-1])
            last_bad = False
        except json.JSONDecodeError:
            pass
        where = "the last line is cut off (job killed mid-write, or still writing)" if last_bad else "damaged lines"
        warnings.append(f"{_rel(path, run_dir)}: {len(lines) - len(records)} unreadable line(s) skipped: {where}")
    return records


def _config(run_dir: Path, warnings: list[str]) -> dict[str, Any]:
    """RUN_DIR/config.yaml as plain YAML (a run from an older schema still loads), else a stage's copy."""
    candidates = [run_dir / "config.yaml"] + sorted(run_dir.glob("stage_*/train/config.yaml"))
    for path in candidates:
        if path.exists():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                warnings.append(f"{_rel(path, run_dir)}: unreadable YAML ({exc}); ignored")
                continue
            if isinstance(data, dict):
                return data
    warnings.append("no config.yaml: run name from the directory, compute hours assume 1 CPU core per task")
    return {}


def _stage_dirs(run_dir: Path) -> dict[int, Path]:
    out = {}
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        m = _STAGE_DIR.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"{run_dir} does not exist; pass RUN_DIR = RUN_ROOT/<run> (`python -m jobs runs RUN_ROOT`)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run dir; pass RUN_DIR = RUN_ROOT/<run>")
    markers = ("config.yaml", "plan.json", "jobs.json")
    if any((run_dir / m).exists() for m in markers) or _stage_dirs(run_dir):
        return
    inner = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and ((p / "config.yaml").exists() or _stage_dirs(p)))
    if inner:
        raise ReportError(
            f"{run_dir} is a RUN_ROOT holding runs ({', '.join(inner[:6])}{', ...' if len(inner) > 6 else ''}), not "
            f"a run dir; pass those, e.g. {run_dir / inner[0]}, or list them with `python -m jobs runs {run_dir}`"
        )
    raise ReportError(
        f"{run_dir} is not a run dir: it has no config.yaml, plan.json or stage_NN/; pass the --run-dir of "
        f"`python -m jobs submit` (RUN_ROOT/<run>)"
    )


def tower_params(spec: ArchSpec) -> dict[str, int]:
    """Parameters per tower, ``{"image", "text", "shared", "other"}``, summing to ``spec.params()``.

    Same terms as :meth:`ArchSpec.params` (its docstring lists them): each tower's embeddings, blocks,
    final norm and projection; ``shared`` holds the shared encoder's blocks and its in/out projections
    for both modalities; ``other`` is the logit scale.
    """
    im, tx, sh, e = spec.image, spec.text, spec.shared, spec.embed_dim
    image = (
        im.width * 3 * im.patch_size**2
        + 2 * im.width
        + (im.num_patches + 1) * im.width
        + im.depth * block_params(im.width, im.mlp_width)
        + 2 * im.width
        + e * im.width
    )
    text = (tx.vocab_size + tx.context_length) * tx.width + tx.depth * block_params(tx.width, tx.mlp_width)
    text += 2 * tx.width + e * tx.width
    shared = 0
    if sh.depth > 0:
        shared = sh.depth * block_params(sh.width, sh.mlp_width)
        shared += sum(2 * sh.width * d + sh.width + d for d in (im.width, tx.width))
    out = {"image": image, "text": text, "shared": shared, "other": spec.params() - image - text - shared}
    assert out["other"] == 1, f"tower_params out of step with ArchSpec.params(): {out}"
    return out


def _wall_seconds(events: list[dict[str, Any]]) -> float | None:
    """Logged wall time of a training: per job segment (start/resume → its last event), summed."""
    total, seg_start, seg_last = 0.0, None, None
    for e in events:
        t = e.get("time")
        if not isinstance(t, int | float):
            continue
        if e.get("event") in ("start", "resume"):
            if seg_start is not None and seg_last is not None:
                total += seg_last - seg_start
            seg_start = t
        seg_last = t
    if seg_start is None or seg_last is None:
        return None
    return total + (seg_last - seg_start)


def _train_part(train_dir: Path, run_dir: Path, warnings: list[str]) -> dict[str, Any]:
    events = _events(train_dir / "events.jsonl", run_dir, warnings)
    steps = [e for e in events if e.get("event") == "train" and isinstance(e.get("loss"), int | float)]
    start = next((e for e in events if e.get("event") == "start"), None)
    ends = [e for e in events if e.get("event") == "end"]
    evals = [e for e in events if e.get("event") == "eval"]
    end = ends[-1] if ends else None
    spec_json = _json(train_dir / "spec.json", run_dir, warnings) or (start or {}).get("spec")
    samples = int(end["samples"]) if end else (int(steps[-1].get("samples", 0)) if steps else 0)
    eval_s = None
    if end and evals and isinstance(evals[-1].get("time"), int | float):
        eval_s = max(0.0, float(evals[-1]["time"]) - float(end["time"]))
    return {
        "events": bool(events),
        "spec": spec_json,
        "start": start,
        "finished": end is not None and (train_dir / "final.pt").exists(),
        "steps_done": int(end["step"]) if end else (int(steps[-1].get("step", 0)) if steps else 0),
        "steps_planned": int(start["steps"]) if start and "steps" in start else None,
        "samples": samples,
        "curve": [(int(e.get("step", 0)), int(e.get("samples", 0)), float(e["loss"])) for e in steps],
        "wall_s": _wall_seconds(events) if events else None,
        "preemptions": sum(e.get("event") == "preempted" for e in events),
        "eval_s": eval_s,
        "kernels": (start or {}).get("kernels"),
        "world_size": (start or {}).get("world_size"),
        "last_time": max((e["time"] for e in events if isinstance(e.get("time"), int | float)), default=None),
    }


def _first_loss(events_path: Path, run_dir: Path, warnings: list[str]) -> tuple[float | None, float | None]:
    steps = [e for e in _events(events_path, run_dir, warnings) if e.get("event") == "train" and "loss" in e]
    return (float(steps[0]["loss"]), float(steps[-1]["loss"])) if steps else (None, None)


def _search_part(sd: Path, t: int, run_dir: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """One row per candidate of stage t: listed in candidates.json and/or present as cand_KK/."""
    search = sd / "search"
    listed = (_json(search / "candidates.json", run_dir, warnings) or {}).get("candidates", [])
    present = {int(m.group(1)) for p in search.glob("cand_*") if (m := _CAND_DIR.match(p.name)) and p.is_dir()}
    sel = _json(sd / "selected.json", run_dir, warnings)
    ranks = {r["index"]: r.get("rank") for r in (sel or {}).get("table", [])}
    winner = sel["winner"]["index"] if sel else None
    rows = []
    for k in sorted(set(range(len(listed))) | present):
        cd = search / f"cand_{k:02d}"
        res = _json(cd / "result.json", run_dir, warnings)
        failed = _json(cd / "failed.json", run_dir, warnings)
        spec_json = _json(cd / "spec.json", run_dir, warnings)
        growth = _json(cd / "growth.json", run_dir, warnings) or (res or {}).get("growth")
        name = (res or failed or spec_json or (listed[k] if k < len(listed) else {})).get("name", "?")
        cand_events = _events(cd / "events.jsonl", run_dir, warnings)
        first, last = _first_loss(cd / "work" / f"stage_{t:02d}" / "train" / "events.jsonl", run_dir, warnings)
        preempted = [e for e in cand_events if e.get("event") == "preempted"]
        if res:
            status = "done"
        elif failed:
            status = "failed"
        elif cand_events and cand_events[-1].get("event") == "preempted":
            status = f"preempted at step {cand_events[-1].get('step')}"
        else:
            status = "running or killed" if cd.exists() else "not started"
        row: dict[str, Any] = {
            "stage": t,
            "index": k,
            "name": name,
            "status": status,
            "preemptions": len(preempted),
            "winner": k == winner,
            "rank": ranks.get(k),
            "params": None,
            "cost": None,
            "cost_ratio": None,
            "val_loss": None,
            "proxy_acc1": None,
            "score": None,
            "steps": None,
            "samples": None,
            "train_flops": None,
            "seconds": None,
            "first_search_loss": first,
            "last_search_loss": last,
            "growth_error_max": max(growth["error"].values()) if growth and growth.get("error") else None,
            "error": failed.get("error") if failed and not res else None,
        }
        if k < len(listed):
            row.update(cost=listed[k].get("cost"), cost_ratio=listed[k].get("cost_ratio"))
            if "spec" in listed[k]:
                row["params"] = ArchSpec.from_dict(listed[k]["spec"]).params()
        if res:
            for key in ("params", "cost", "cost_ratio", "val_loss", "proxy_acc1", "score", "steps", "samples"):
                row[key] = res.get(key, row[key])
            row["train_flops"] = res.get("train_flops")
            # result.json times the last attempt only; a preempted candidate's earlier attempts count too
            row["seconds"] = _wall_seconds(cand_events) if preempted else res.get("seconds")
        elif failed and cand_events and isinstance(failed.get("time"), int | float):
            t0 = cand_events[0].get("time")
            row["seconds"] = max(0.0, failed["time"] - t0) if isinstance(t0, int | float) else None
        rows.append(row)
    return rows


def _retrieval(tasks: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        name: {k: v for k, v in r.items() if k.startswith(("image_to_text_R@", "text_to_image_R@"))}
        for name, r in tasks.items()
        if r.get("type") == "retrieval"
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _compute_model(cfg: dict[str, Any]) -> dict[str, Any]:
    cl = cfg.get("cluster") or {}
    gpus, nodes, cpus = int(cl.get("gpus_per_node", 0) or 0), int(cl.get("nodes", 1) or 1), cl.get("cpus_per_task")
    cpus = int(cpus) if cpus else 1
    if gpus > 0:
        return {
            "unit": "GPU-hours",
            "train_devices": nodes * gpus,
            "task_devices": 1,
            "note": f"estimated GPU-hours = wall time x GPUs requested (training {nodes}x{gpus}, 1 per search or "
            "eval task)",
        }
    return {
        "unit": "CPU core-hours",
        "train_devices": nodes * cpus,
        "task_devices": cpus,
        "note": f"cluster.gpus_per_node is 0: CPU core-hours = wall time x cores requested ({cpus} per task, "
        f"{nodes} node(s) for training) instead of GPU-hours",
    }


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows about one run, as a JSON-ready dict.

    Args:
        run_dir: RUN_ROOT/<run> (finished, running or failed).

    Returns:
        ``{"format", "version", "run_dir", "name", "seed", "stages_planned", "stages_submitted",
        "stages_done", "compute", "stages": [...], "search": [...], "oracle": [summary.json per stage that
        has one], "growth": [...], "kernels",
        "loss_curve": [...], "warnings": [...], "notes": [...]}`` — the keys of each row are the
        column names of the report's tables (module docstring: definitions).

    Raises:
        ReportError: ``run_dir`` is not a run dir (missing, a file, a RUN_ROOT, or unrelated).
    """
    run_dir = Path(run_dir).resolve()
    _check_run_dir(run_dir)
    warnings: list[str] = []
    cfg = _config(run_dir, warnings)
    plan = _json(run_dir / "plan.json", run_dir, warnings) or {}
    found = _stage_dirs(run_dir)
    planned = int((cfg.get("data") or {}).get("stages") or 0) or max([*plan.get("stages", []), *found, 0])
    compute = _compute_model(cfg)
    stages, search_rows, growth, kernels, curve, oracles = [], [], [], {}, [], []
    cum_flops, cum_hours, cum_samples = 0, 0.0, 0
    prev: dict[str, Any] | None = None
    last_found = max(found, default=0)
    for t in range(1, max(planned, last_found) + 1):
        sd = stage_path(run_dir, t)
        row: dict[str, Any] = {"stage": t, "status": "not started", "chosen": None, "arch": None, "spec": None}
        if not sd.is_dir():
            if t < last_found:
                row["status"] = "missing"
                warnings.append(f"stage_{t:02d}/ is missing although later stages exist (deleted or moved?)")
            stages.append(row)
            prev = None
            continue
        tr = _train_part(sd / "train", run_dir, warnings)
        cands = _search_part(sd, t, run_dir, warnings) if t > 1 else []
        sel = _json(sd / "selected.json", run_dir, warnings) if t > 1 else None
        ev = _json(sd / "eval" / "metrics.json", run_dir, warnings)
        spec_json = tr["spec"] or (sel["winner"]["spec"] if sel else None)
        if spec_json is None and t == 1 and isinstance(cfg.get("model"), dict):
            spec_json = cfg["model"]
        spec = ArchSpec.from_dict(spec_json) if spec_json else None
        win = next((c for c in cands if c["winner"]), None)
        done_cands = [c for c in cands if c["status"] == "done"]
        search_flops = sum(int(c["train_flops"] or 0) for c in done_cands)
        search_s = sum(float(c["seconds"] or 0.0) for c in cands)
        train_flops = spec.flops_per_sample() * tr["samples"] if spec else 0
        cum_flops += search_flops + train_flops
        train_s = tr["wall_s"] or 0.0
        hours = (
            train_s * compute["train_devices"] + (search_s + (tr["eval_s"] or 0.0)) * compute["task_devices"]
        ) / 3600
        cum_hours += hours
        if ev:
            status = "evaluated"
        elif tr["finished"]:
            status = "trained (not evaluated)"
        elif tr["events"]:
            status = "training" + (f" (step {tr['steps_done']}/{tr['steps_planned']})" if tr["steps_planned"] else "")
        elif sel:
            status = "selected"
        elif cands:
            status = f"searching ({len(done_cands)}/{len(cands)} candidates scored)"
        else:
            status = "started"
        if not ev and tr["finished"]:
            warnings.append(f"stage_{t:02d}/eval/metrics.json is missing: stage {t} was trained but not evaluated")
        tasks = (ev or {}).get("tasks", {})
        acc1 = {n: r["acc1"] for n, r in sorted(tasks.items()) if r.get("type") == "classification" and "acc1" in r}
        retrieval = _retrieval(tasks)
        i2t = [r["image_to_text_R@1"] for r in retrieval.values() if "image_to_text_R@1" in r]
        t2i = [r["text_to_image_R@1"] for r in retrieval.values() if "text_to_image_R@1" in r]
        towers = tower_params(spec) if spec else {}
        row.update(
            status=status,
            chosen=(sel["winner"]["name"] if sel else None) if t > 1 else "initial",
            arch=arch_summary(spec) if spec else None,
            spec=spec.to_dict() if spec else None,
            params=spec.params() if spec else None,
            params_image=towers.get("image"),
            params_text=towers.get("text"),
            params_shared=towers.get("shared"),
            flops_per_sample=spec.flops_per_sample() if spec else None,
            train_steps=tr["steps_done"],
            train_steps_planned=tr["steps_planned"],
            samples_seen=tr["samples"],
            search_samples=sum(int(c["samples"] or 0) for c in done_cands),
            train_flops=train_flops,
            search_flops=search_flops,
            stage_flops=search_flops + train_flops,
            cum_flops=cum_flops,
            train_wall_s=tr["wall_s"],
            train_preemptions=tr["preemptions"],
            search_preemptions=sum(c["preemptions"] for c in cands),
            search_task_s=search_s if cands else None,
            eval_s=tr["eval_s"],
            compute_hours=hours,
            cum_compute_hours=cum_hours,
            first_train_loss=tr["curve"][0][2] if tr["curve"] else None,
            final_train_loss=tr["curve"][-1][2] if tr["curve"] else None,
            val_loss=win["val_loss"] if win else None,
            heldout_loss=((ev or {}).get("heldout") or {}).get("val_loss"),  # after full training (eval step)
            acc1=acc1,
            mean_acc1=(ev or {}).get("summary", {}).get("mean_acc1") if ev else None,
            retrieval=retrieval,
            **{"i2t_R@1": _mean(i2t), "t2i_R@1": _mean(t2i)},
            candidates=len(cands),
            candidates_failed=sum(c["status"] == "failed" for c in cands),
            last_event_time=tr["last_time"],
        )
        stages.append(row)
        search_rows += cands
        oracle = _json(sd / "oracle" / "summary.json", run_dir, warnings) if t > 1 else None
        if oracle is not None:
            oracles.append(oracle)
        if tr["kernels"]:
            kernels[str(t)] = tr["kernels"]
        for step, samples, loss in tr["curve"]:
            curve.append(
                {"stage": t, "step": step, "samples": samples, "cum_samples": cum_samples + samples, "loss": loss}
            )
        record = (sel or {}).get("growth")
        if record is None and win is not None:
            record = _json(sd / "search" / f"cand_{win['index']:02d}" / "growth.json", run_dir, warnings)
        if t > 1 and record:
            growth.append(
                {
                    "stage": t,
                    "candidate": record.get("candidate", row["chosen"]),
                    "ops": record.get("ops", []),
                    "ops_text": _ops_text(record.get("ops", [])),
                    "params_before": record.get("params_before"),
                    "params_after": record.get("params_after"),
                    "preservation_error": record.get("error", {}),
                    "preservation_error_max": max(record["error"].values()) if record.get("error") else None,
                    "momentum": record.get("momentum"),
                    "source": record.get("source"),
                    "loss_before": prev["final_train_loss"] if prev else None,
                    "loss_after": row["first_train_loss"],
                    "loss_after_search": win["first_search_loss"] if win else None,
                    "cum_samples": cum_samples,
                }
            )
        cum_samples += tr["samples"]
        prev = row
    if not any(s["status"] != "not started" for s in stages):
        warnings.append("no stage has started yet")
    notes = [COMPUTE_NOTE, compute["note"], VAL_LOSS_NOTE]
    return {
        "format": REPORT_FORMAT,
        "version": 1,
        "run_dir": str(run_dir),
        "name": str(cfg.get("name") or run_dir.name),
        "seed": (cfg.get("train") or {}).get("seed"),
        "stages_planned": planned,
        "stages_submitted": plan.get("stages"),
        "stages_done": sum(1 for s in stages if s["status"] == "evaluated"),
        "compute": compute,
        "stages": stages,
        "search": search_rows,
        "oracle": oracles,
        "growth": growth,
        "kernels": kernels,
        "loss_curve": curve,
        "warnings": warnings,
        "notes": notes,
    }


def _ops_text(ops: list[dict[str, Any]]) -> str:
    if not ops:
        return "none"
    return ", ".join(f"{o.get('op')} {o.get('tower')} {o.get('from', '?'):g}→{o.get('to', '?'):g}" for o in ops)


# ------------------------------------------------------------------------------------------- compare
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


# ------------------------------------------------------------------------------------------ rendering
def _num(x: Any, kind: str = "f4") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "f3":
        return f"{x:.3f}"
    if kind == "f4":
        return f"{x:.4f}"
    if kind == "g3":
        return f"{x:.3g}"
    if kind == "params":
        return f"{x / 1e6:.3f}M"
    if kind == "s":
        return f"{x:.1f}"
    if kind == "h":
        return f"{x:.4f}" if x < 10 else f"{x:.1f}"
    return str(x)


# ("h", level, text) | ("p", text) | ("ul", [items]) | ("table", head, rows) | ("img", path, alt)
Block = tuple[Any, ...]


def _rkey(key: str) -> tuple[int, int]:
    """Order retrieval columns i2t before t2i, then by k (R@1, R@5, R@10)."""
    direction, _, k = key.partition("_R@")
    return (0 if direction == "image_to_text" else 1, int(k) if k.isdigit() else 0)


def _stage_tables(run: dict[str, Any]) -> list[Block]:
    """Two tables per run: architecture and compute; losses and evaluation."""
    unit = run["compute"]["unit"]
    head = ["stage", "status", "chosen", "arch", "params", "FLOPs/sample", "train steps", "samples seen"]
    head += ["stage FLOPs (search+train)", "cum FLOPs", "train wall s", "search task s", f"est. {unit}"]
    head += [f"cum {unit}", "preempted (train/search)"]
    rows = [
        [
            str(s["stage"]),
            s["status"],
            s.get("chosen") or "-",
            s.get("arch") or "-",
            _num(s.get("params"), "params"),
            _num(s.get("flops_per_sample"), "g3"),
            _num(s.get("train_steps"), "int"),
            _num(s.get("samples_seen"), "int"),
            _num(s.get("stage_flops"), "g3"),
            _num(s.get("cum_flops"), "g3"),
            _num(s.get("train_wall_s"), "s"),
            _num(s.get("search_task_s"), "s"),
            _num(s.get("compute_hours"), "h"),
            _num(s.get("cum_compute_hours"), "h"),
            f"{s.get('train_preemptions', 0)}/{s.get('search_preemptions', 0)}",
        ]
        for s in run["stages"]
    ]
    tasks = sorted({t for s in run["stages"] for t in s.get("acc1", {})})
    rkeys = sorted(
        {(task, k) for s in run["stages"] for task, r in s.get("retrieval", {}).items() for k in r},
        key=lambda tk: (tk[0], _rkey(tk[1])),
    )
    head2 = ["stage", "final train loss", "val_loss (search winner)"] + [f"acc1 {t}" for t in tasks] + ["mean acc1"]
    head2 += [f"{task} {k.replace('image_to_text_', 'i2t ').replace('text_to_image_', 't2i ')}" for task, k in rkeys]
    rows2 = [
        [str(s["stage"]), _num(s.get("final_train_loss")), _num(s.get("val_loss"))]
        + [_num(s.get("acc1", {}).get(t), "f3") for t in tasks]
        + [_num(s.get("mean_acc1"), "f3")]
        + [_num(s.get("retrieval", {}).get(task, {}).get(k), "f3") for task, k in rkeys]
        for s in run["stages"]
    ]
    return [("table", head, rows), ("table", head2, rows2)]


def _search_table(rows: list[dict[str, Any]]) -> Block:
    head = ["cand", "name", "status", "params", "cost", "cost ratio", "steps", "val_loss", "proxy_acc1", "score"]
    head += ["rank", "winner", "first search loss", "search FLOPs", "seconds", "preempted", "failure"]
    out = [
        [
            f"{c['index']:02d}",
            c["name"],
            c["status"],
            _num(c["params"], "params"),
            _num(c["cost"], "g3"),
            _num(c["cost_ratio"], "f3"),
            _num(c["steps"], "int"),
            _num(c["val_loss"]),
            _num(c["proxy_acc1"], "f3"),
            _num(c["score"]),
            _num(c["rank"], "int"),
            "winner" if c["winner"] else "",
            _num(c["first_search_loss"]),
            _num(c["train_flops"], "g3"),
            _num(c["seconds"], "s"),
            _num(c["preemptions"], "int"),
            (c["error"] or "")[:160],
        ]
        for c in rows
    ]
    return ("table", head, out)


def _oracle_blocks(summaries: list[dict[str, Any]]) -> list[Block]:
    """Per stage with an oracle (``jobs oracle``): Kendall tau, regret and every candidate's full training."""
    blocks: list[Block] = []
    for o in summaries:
        tau = o["kendall_tau"]
        blocks.append(
            (
                "p",
                f"Stage {o['stage']}: every candidate trained fully. Kendall tau of the search ranking against "
                f"full training: {_num(tau['val_loss'], 'f3')} (held-out loss), {_num(tau['mean_acc1'], 'f3')} "
                f"(mean zero-shot top-1); regret {_num(o['regret_mean_acc1'], 'f3')} (chosen {o['chosen']}, best "
                f"{o['best_mean_acc1']})" + (f"; no result yet: {', '.join(o['missing'])}" if o["missing"] else ""),
            )
        )
        head = ["candidate", "chosen", "search score", "search rank", "val_loss", "mean acc1", "i2t R@1", "t2i R@1"]
        head += ["params", "train FLOPs"]
        rows = [
            [
                r["name"],
                "chosen" if r["chosen"] else "",
                _num(r["search_score"]),
                _num(r["search_rank"], "int"),
                _num(r["val_loss"]),
                _num(r["mean_acc1"], "f3"),
                _num(r["i2t_R@1"], "f3"),
                _num(r["t2i_R@1"], "f3"),
                _num(r["params"], "params"),
                _num(r["train_flops"], "g3"),
            ]
            for r in sorted(o["candidates"], key=lambda r: r["search_rank"] or 0)
        ]
        blocks.append(("table", head, rows))
    return blocks


def _growth_table(growth: list[dict[str, Any]]) -> Block:
    head = ["stage", "candidate", "ops", "params before", "params after", "preservation error (max)"]
    head += ["momentum", "loss before (end of t-1)", "loss after (first of t)", "loss after (search start)"]
    rows = [
        [
            str(g["stage"]),
            str(g["candidate"]),
            g["ops_text"],
            _num(g["params_before"], "params"),
            _num(g["params_after"], "params"),
            _num(g["preservation_error_max"], "g3"),
            _num(g["momentum"], "g3"),
            _num(g["loss_before"]),
            _num(g["loss_after"]),
            _num(g["loss_after_search"]),
        ]
        for g in growth
    ]
    return ("table", head, rows)


def _kernel_block(kernels: dict[str, dict[str, str]]) -> Block:
    if not kernels:
        return ("p", "No kernel report logged yet (the trainer's start event names them).")
    distinct = {json.dumps(v, sort_keys=True) for v in kernels.values()}
    stages = sorted(kernels, key=int)
    cols = ["all stages"] if len(distinct) == 1 else [f"stage {s}" for s in stages]
    names = sorted({k for v in kernels.values() for k in v})
    rows = []
    for name in names:
        vals = (
            [kernels[stages[0]].get(name, "-")] if len(distinct) == 1 else [kernels[s].get(name, "-") for s in stages]
        )
        rows.append([name, *vals])
    return ("table", ["kernel", *cols], rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """One distinct label per run (plot files are named after them): the config name, then the run dir's
    name where names repeat, then an index where even that repeats."""
    names = [r["name"] for r in runs]
    labels = [r["name"] if names.count(r["name"]) == 1 else f"{r['name']} ({Path(r['run_dir']).name})" for r in runs]
    slugs = [_slug(x) for x in labels]
    return [f"{x} #{i + 1}" if slugs.count(_slug(x)) > 1 else x for i, x in enumerate(labels)]


def plot_files(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Plot key → file name under the report's ``plots/`` (``<run>_loss.png`` ... and the shared ones)."""
    files = {"zeroshot_vs_compute": "zeroshot_vs_compute.png"}
    for label in _labels(runs):
        for kind in ("loss", "arch", "search"):
            files[f"{label}/{kind}"] = f"{_slug(label)}_{kind}.png"
    return files


def comparison_blocks(cmp: dict[str, Any]) -> list[Block]:
    """The side-by-side section: final metrics per run, then metrics at equal compute (stated as such)."""
    tasks = cmp["tasks"]
    head = ["run", "seed", "stages done", "final arch", "params", "cum FLOPs", "est. compute"]
    head += [f"acc1 {t}" for t in tasks] + ["mean acc1", "i2t R@1", "t2i R@1", "at stage"]
    rows = [
        [
            r["run"],
            _num(r["seed"], "int"),
            f"{r['stages_done']}/{r['stages_planned']}",
            r["arch"] or "-",
            _num(r["params"], "params"),
            _num(r["cum_flops"], "g3"),
            f"{_num(r['compute_hours'], 'h')} {r['compute_unit']}",
        ]
        + [_num(r["acc1"].get(t), "f3") for t in tasks]
        + [_num(r[m], "f3") for m in COMPARE_METRICS]
        + [_num(r["evaluated_stage"], "int")]
        for r in cmp["runs"]
    ]
    eq = cmp["equal_compute"]
    blocks: list[Block] = [
        ("h", 2, "Comparison"),
        (
            "p",
            "Last evaluated stage of each run (zero-shot top-1 per task and mean; retrieval R@1 mean over "
            "retrieval tasks).",
        ),
        ("table", head, rows),
        ("h", 3, "At equal compute"),
    ]
    if eq["flops"] is None:
        blocks.append(("p", "Not available: a run has no evaluated stage yet."))
    else:
        blocks.append(("p", f"Metrics at {eq['flops']:.4g} FLOPs — {eq['method']}."))
        blocks.append(
            (
                "table",
                ["run", "mean acc1 @ equal compute", "i2t R@1 @ equal compute", "t2i R@1 @ equal compute", "note"],
                [[r["run"], *(_num(r[m], "f3") for m in COMPARE_METRICS), r["note"] or ""] for r in eq["rows"]],
            )
        )
    return blocks


def report_blocks(runs: list[dict[str, Any]], plots: dict[str, str] | None = None) -> list[Block]:
    """The report as a list of blocks (headings, paragraphs, tables, images) that md and html render."""
    blocks: list[Block] = [("h", 1, "GrowCLIP run report")]
    blocks.append(
        ("p", f"{len(runs)} run(s), read from their run dirs only (JSON markers, events.jsonl; no model was run).")
    )
    if len(runs) > 1:
        blocks += comparison_blocks(compare_runs(runs))
    if plots and "zeroshot_vs_compute" in plots:
        blocks.append(("img", f"plots/{plots['zeroshot_vs_compute']}", "zero-shot mean acc1 vs cumulative compute"))
    for run, label in zip(runs, _labels(runs), strict=True):
        blocks.append(("h", 2, f"Run {label}"))
        blocks.append(
            (
                "p",
                f"{run['run_dir']} — stages evaluated {run['stages_done']}/{run['stages_planned']}"
                + (f", seed {run['seed']}" if run.get("seed") is not None else ""),
            )
        )
        if run["warnings"]:
            blocks.append(("p", "Warnings (reported, not fatal):"))
            blocks.append(("ul", run["warnings"]))
        blocks.append(("h", 3, "Stages"))
        blocks += _stage_tables(run)
        blocks.append(("ul", run["notes"]))
        blocks.append(("h", 3, "Search"))
        stages_with_search = sorted({c["stage"] for c in run["search"]})
        if not stages_with_search:
            blocks.append(("p", "No search yet (stage 1 trains the config's model)."))
        for t in stages_with_search:
            rows = [c for c in run["search"] if c["stage"] == t]
            failed = [c for c in rows if c["status"] != "done"]
            blocks.append(
                (
                    "p",
                    f"Stage {t}: {len(rows)} candidates, {len(rows) - len(failed)} scored, {len(failed)} without "
                    "a result; lower score wins.",
                )
            )
            blocks.append(_search_table(rows))
        if run.get("oracle"):
            blocks.append(("h", 3, "Search fidelity (oracle)"))
            blocks += _oracle_blocks(run["oracle"])
        blocks.append(("h", 3, "Growth events"))
        blocks.append(_growth_table(run["growth"]) if run["growth"] else ("p", "No growth event yet."))
        blocks.append(("h", 3, "Kernels used"))
        blocks.append(_kernel_block(run["kernels"]))
        if plots:
            blocks.append(("h", 3, "Plots"))
            for kind, alt in (
                ("loss", "training loss vs samples seen, growth events marked"),
                ("arch", "architecture timeline: params per tower per stage"),
                ("search", "search: cost vs score, winner marked"),
            ):
                if f"{label}/{kind}" in plots:
                    blocks.append(("img", f"plots/{plots[f'{label}/{kind}']}", alt))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    """Markdown of :func:`report_blocks`; images link ``plots/*.png`` relative to the report."""
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif b[0] == "table":
            out.append(markdown_table(b[1], b[2]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], images: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page: the PNGs in ``images`` (path → bytes) are embedded as base64."""
    images = images or {}
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            data = images.get(b[1])
            src = f"data:image/png;base64,{base64.b64encode(data).decode()}" if data is not None else html.escape(b[1])
            alt = html.escape(b[2])
            body.append(f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:100%}table{border-collapse:collapse;margin:1em 0;"
        "font-size:13px}th,td{border:1px solid #bbb;padding:3px 6px;text-align:left}th{background:#eee}"
        "img{max-width:900px}figure{margin:1em 0}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>GrowCLIP run report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


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


# ------------------------------------------------------------------- the pipeline's text summary (stdout)
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
        )
    tasks = sorted({name for r in rows for name in r["acc1"]})
    head = ["stage", "chosen", "params"] + tasks + ["mean_acc1", "i2t_R@1", "t2i_R@1"]
    table = [head]
    for r in rows:
        table.append(
            [str(r["stage"]), r["chosen"] or "?", _num(r["params"], "params")]
            + [_num(r["acc1"].get(t), "f3") for t in tasks]
            + [_num(r["mean_acc1"], "f3"), _num(r["i2t_R@1"], "f3"), _num(r["t2i_R@1"], "f3")]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    for o in run["oracle"]:
        lines += ["", format_oracle(o)]
    return "\n".join(lines)
