"""Tolerant readers of one run dir's files, for :func:`jobs.engine.report.load.load_run`.

The markers a job writes (DESIGN.md "On disk"): ``config.yaml``, ``plan.json``, JSON markers
(``spec.json``, ``selected.json``, ``result.json``, ``failed.json``, ``growth.json``, ...) and
``events.jsonl`` logs. A damaged or half-written file (a job killed mid-write, or writing now) is a
line in ``warnings``, never an exception; only a path that is not a run dir raises :class:`ReportError`.
``_train_part`` and ``_search_part`` condense one stage's training and search into plain dicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from jobs.engine.metrics import read_events
from jobs.engine.records import classify_candidate
from jobs.engine.rundir import RunDir, StageDir, TrainDir
from model.spec import ArchSpec


class ReportError(ValueError):
    """A path given to the report is not a run dir (the message names the path and the fix)."""


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
    rd = RunDir(run_dir)
    candidates = [rd.config_yaml] + [s.train.config_yaml for s in rd.stages().values()]
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


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"{run_dir} does not exist; pass RUN_DIR = RUN_ROOT/<run> (`python -m jobs runs RUN_ROOT`)")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run dir; pass RUN_DIR = RUN_ROOT/<run>")
    if RunDir(run_dir).looks_like_run():
        return
    inner = sorted(
        p.name for p in run_dir.iterdir() if p.is_dir() and (RunDir(p).config_yaml.exists() or RunDir(p).stages())
    )
    if inner:
        raise ReportError(
            f"{run_dir} is a RUN_ROOT holding runs ({', '.join(inner[:6])}{', ...' if len(inner) > 6 else ''}), not "
            f"a run dir; pass those, e.g. {run_dir / inner[0]}, or list them with `python -m jobs runs {run_dir}`"
        )
    raise ReportError(
        f"{run_dir} is not a run dir: it has no config.yaml, plan.json or stage_NN/; pass the --run-dir of "
        f"`python -m jobs submit` (RUN_ROOT/<run>)"
    )


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


def _train_part(train: TrainDir, run_dir: Path, warnings: list[str]) -> dict[str, Any]:
    events = _events(train.events, run_dir, warnings)
    steps = [e for e in events if e.get("event") == "train" and isinstance(e.get("loss"), int | float)]
    start = next((e for e in events if e.get("event") == "start"), None)
    ends = [e for e in events if e.get("event") == "end"]
    evals = [e for e in events if e.get("event") == "eval"]
    end = ends[-1] if ends else None
    spec_json = _json(train.spec_json, run_dir, warnings) or (start or {}).get("spec")
    samples = int(end["samples"]) if end else (int(steps[-1].get("samples", 0)) if steps else 0)
    eval_s = None
    if end and evals and isinstance(evals[-1].get("time"), int | float):
        eval_s = max(0.0, float(evals[-1]["time"]) - float(end["time"]))
    return {
        "events": bool(events),
        "spec": spec_json,
        "start": start,
        "finished": end is not None and train.final.exists(),
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


def _search_part(sd: StageDir, run_dir: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """One row per candidate of stage t: listed in candidates.json and/or present as cand_KK/."""
    t = sd.stage
    listed = (_json(sd.candidates_json, run_dir, warnings) or {}).get("candidates", [])
    present = {cd.index for cd in sd.cands()}
    sel = _json(sd.selected_json, run_dir, warnings)
    ranks = {r["index"]: r.get("rank") for r in (sel or {}).get("table", [])}
    winner = sel["winner"]["index"] if sel else None
    rows = []
    for k in sorted(set(range(len(listed))) | present):
        cd = sd.cand(k)
        res = _json(cd.result_json, run_dir, warnings)
        failed = _json(cd.failed_json, run_dir, warnings)
        spec_json = _json(cd.spec_json, run_dir, warnings)
        growth = _json(cd.growth_json, run_dir, warnings) or (res or {}).get("growth")
        name = (res or failed or spec_json or (listed[k] if k < len(listed) else {})).get("name", "?")
        cand_events = _events(cd.events, run_dir, warnings)
        first, last = _first_loss(cd.work_train(t).events, run_dir, warnings)
        preempted = [e for e in cand_events if e.get("event") == "preempted"]
        st = classify_candidate(cd.path.exists(), res, failed, cand_events)
        status = {"preempted": f"preempted at step {st.step}", "running": "running or killed"}.get(st.state, st.state)
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
            "round": None,
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
            row["round"] = res.get("round", 1)  # the search round it reached (successive halving)
            row["train_flops"] = res.get("train_flops")
            # result.json times the last attempt only; a preempted candidate's earlier attempts count too
            row["seconds"] = _wall_seconds(cand_events) if preempted else res.get("seconds")
        elif failed and cand_events and isinstance(failed.get("time"), int | float):
            t0 = cand_events[0].get("time")
            row["seconds"] = max(0.0, failed["time"] - t0) if isinstance(t0, int | float) else None
        rows.append(row)
    return rows
