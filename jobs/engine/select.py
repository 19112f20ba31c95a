"""Select the winner of a stage's search (DESIGN.md step 3, "select").

Reads every ``cand_KK/result.json`` of the stage, ranks the finished candidates by score (lower
wins; ties: fewer params, then candidate index), and writes ``stage_NN/selected.json`` — the table,
the winner, the reason in words, and the winner's growth record — plus ``stage_NN/selected.pt``, a
copy of the winner's grown (PIM-inherited, not search-trained) checkpoint that the stage's training
starts from (``train --init``). Candidates without a result (failed, killed, never ran) are listed
with the reason from ``failed.json``; selection fails when fewer than ``search.min_successful``
finished. Idempotent: an existing ``selected.json`` is returned unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from jobs.config import RunCfg
from jobs.engine.checkpoint import load_checkpoint, save_checkpoint
from jobs.engine.pipeline import stage_candidates
from jobs.engine.records import CandidateResult, Selection, candidate_status, read_record
from jobs.engine.rundir import RunDir, read_json
from jobs.engine.score import SearchScore

__all__ = ["SelectionError", "run_select", "growth_lines"]

logger = logging.getLogger(__name__)


class SelectionError(RuntimeError):
    """Too few candidates finished (or stage t-1 is not trained)."""


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def growth_lines(stage: int, record: dict[str, Any]) -> list[str]:
    """``stage=2 op=grow_depth visual 2→3 params 0.36M→0.40M`` per op (STYLE.md R11)."""
    before, after = _fmt(record["params_before"]), _fmt(record["params_after"])
    if not record["ops"]:
        return [f"stage={stage} op=none params {before}"]
    return [
        f"stage={stage} op={op['op']} {op['tower']} {op['from']:g}→{op['to']:g} params {before}→{after}"
        for op in record["ops"]
    ]


def run_select(cfg: RunCfg, stage: int, run_dir: Path) -> dict[str, Any]:
    """Rank the stage's candidates, write selected.json + selected.pt, and return selected.json's content.

    Raises:
        SelectionError: stage t-1 not trained, or fewer than ``search.min_successful`` results.
    """
    run_dir = Path(run_dir)
    sd = RunDir(run_dir).stage(stage)
    done = read_json(sd.selected_json)
    if done is not None and sd.selected_pt.exists():
        logger.info("stage %d already selected: %s", stage, read_record(Selection, sd.selected_json).winner.name)
        return done
    found = stage_candidates(cfg, run_dir, stage)
    if found is None:
        raise SelectionError(f"stage {stage - 1} is not trained yet: nothing to select from")
    kept, _ = found
    rows: list[dict[str, Any]] = []
    for k, cand in enumerate(kept):
        res = read_record(CandidateResult, sd.cand(k).result_json)
        if res is None:
            status = candidate_status(sd.cand(k))
            why = (
                status.error if status.state == "failed" else "no result (task killed, still running or never started)"
            )
            rows.append({"index": k, "name": cand.name, "status": "failed", "params": cand.spec.params(), "error": why})
            continue
        keys = (*SearchScore.INPUTS, *SearchScore.keys())
        rows.append(
            {
                "index": k,
                "name": cand.name,
                "status": "done",
                "params": res.params,
                **{x: getattr(res, x) for x in keys},
            }
        )
    ok = sorted((r for r in rows if r["status"] == "done"), key=lambda r: (r["score"], r["params"], r["index"]))
    needed = min(cfg.search.min_successful, len(rows))  # a single-candidate stage needs only it
    if len(ok) < needed:
        failed = ", ".join(f"{r['index']}:{r['name']} ({r['error']})" for r in rows if r["status"] != "done")
        raise SelectionError(
            f"stage {stage}: only {len(ok)} of {len(rows)} candidates finished, search.min_successful="
            f"{needed}; missing: {failed}. Resubmit the run to rerun only those"
        )
    for rank, r in enumerate(ok, 1):
        r["rank"] = rank
    win = ok[0]
    if len(ok) == 1:
        reason = f"{win['name']} is the only candidate that finished"
    else:
        second = ok[1]
        describe = SearchScore.describe
        reason = f"{win['name']} has the lowest score {describe(win)}; runner-up {second['name']} {describe(second)}"
    result = read_record(CandidateResult, sd.cand(win["index"]).result_json)
    assert result is not None and result.grown is not None
    grown = load_checkpoint(Path(result.grown))
    save_checkpoint(grown, sd.selected_pt)
    selected = {
        "stage": stage,
        "winner": {"index": win["index"], "name": win["name"], "spec": result.spec, "score": win["score"]},
        "reason": reason,
        "table": sorted(rows, key=lambda r: r["index"]),
        "growth": result.growth,
        "init": str(sd.selected_pt),
        "failed": [r["index"] for r in rows if r["status"] != "done"],
        "score_formula": SearchScore.FORMULA,
    }
    atomic_write_json(sd.selected_json, selected)
    logger.info("stage=%d selected %s: %s", stage, win["name"], reason)
    for line in growth_lines(stage, result.growth or {}):
        logger.info(line)
    return selected
