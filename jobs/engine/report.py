"""What a growth run achieved, stage by stage, read from the run dir (``python -m jobs report``).

Per stage: the chosen candidate and architecture, params, FLOPs spent (forward+backward FLOPs per
sample x samples trained: the search candidates of the stage plus its full training; cumulative
over the stages), zero-shot top-1 per classification task and their mean, retrieval R@1 in both
directions. Plain module: reads JSON files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.engine.metrics import read_events
from jobs.engine.pipeline import arch_summary, read_json, stage_path
from model.spec import ArchSpec

__all__ = ["stage_rows", "format_report"]


def _train_flops(train_dir: Path) -> tuple[ArchSpec | None, int]:
    spec_json = read_json(train_dir / "spec.json")
    if spec_json is None or not (train_dir / "events.jsonl").exists():
        return None, 0
    spec = ArchSpec.from_dict(spec_json)
    ends = [e for e in read_events(train_dir / "events.jsonl") if e.get("event") == "end"]
    samples = int(ends[-1]["samples"]) if ends else 0
    return spec, spec.flops_per_sample() * samples


def stage_rows(run_dir: Path, stages: int) -> list[dict[str, Any]]:
    """One dict per stage that has at least started (see the module docstring for the fields)."""
    rows, cum = [], 0
    for t in range(1, stages + 1):
        sd = stage_path(run_dir, t)
        if not sd.exists():
            break
        search_flops = 0
        for res_path in sorted((sd / "search").glob("cand_*/result.json")):
            search_flops += int(read_json(res_path)["train_flops"])  # type: ignore[index]
        spec, train_flops = _train_flops(sd / "train")
        cum += search_flops + train_flops
        sel = read_json(sd / "selected.json")
        ev = read_json(sd / "eval" / "metrics.json")
        row: dict[str, Any] = {
            "stage": t,
            "chosen": sel["winner"]["name"] if sel else ("initial" if t == 1 else "?"),
            "arch": arch_summary(spec) if spec else "?",
            "params": spec.params() if spec else None,
            "search_flops": search_flops,
            "train_flops": train_flops,
            "cum_flops": cum,
            "acc1": {},
            "mean_acc1": None,
            "i2t_R@1": None,
            "t2i_R@1": None,
        }
        if ev:
            for name, r in ev["tasks"].items():
                if r["type"] == "classification":
                    row["acc1"][name] = r["acc1"]
                elif r["type"] == "retrieval":
                    row["i2t_R@1"], row["t2i_R@1"] = r.get("image_to_text_R@1"), r.get("text_to_image_R@1")
            row["mean_acc1"] = ev["summary"].get("mean_acc1")
        rows.append(row)
    return rows


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_report(run_dir: Path, stages: int) -> str:
    """The per-stage table as text."""
    rows = stage_rows(run_dir, stages)
    if not rows:
        return f"{run_dir}: no stage has started yet"
    lines = []
    for r in rows:
        params = _f(r["params"] / 1e6 if r["params"] else None, "{:.3f}M")
        lines.append(
            f"stage {r['stage']}: chosen={r['chosen']}  arch: {r['arch']}  params {params}  FLOPs spent: search "
            f"{r['search_flops']:.3g} + train {r['train_flops']:.3g}, cumulative {r['cum_flops']:.3g}"
        )
    tasks = sorted({name for r in rows for name in r["acc1"]})
    head = ["stage", "chosen", "params"] + tasks + ["mean_acc1", "i2t_R@1", "t2i_R@1"]
    table = [head]
    for r in rows:
        params = _f(r["params"] / 1e6 if r["params"] else None, "{:.3f}M")
        table.append(
            [str(r["stage"]), r["chosen"], params]
            + [_f(r["acc1"].get(t)) for t in tasks]
            + [_f(r["mean_acc1"]), _f(r["i2t_R@1"]), _f(r["t2i_R@1"])]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)
