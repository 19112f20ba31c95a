"""Select the winner of a stage's search (DESIGN.md step 3, "select").

Reads every ``cand_KK/result.json`` of the stage, ranks the finished candidates by score (lower
wins; ties: fewer params, then candidate index), and writes ``stage_NN/selected.json`` — the table,
the winner, the reason in words, and the winner's growth record — plus ``stage_NN/selected.pt``, a
copy of the winner's grown (PIM-inherited) checkpoint that the stage's training starts from (``train --init``).
Candidates without a result (failed, killed, never ran) are listed with the reason from ``failed.json``;
selection fails when fewer than ``search.min_successful`` finished. Idempotent: an existing ``selected.json``
is returned unchanged.

With ``search.rounds`` R > 1 (successive halving, issue #17) ``select --round r`` ranks round r: before the last
round it writes ``search/round_RR.json`` (the survivors, who train on in round r + 1); the last round writes
selected.json, whose table ranks every candidate by the round it reached, then by its score there. Under
``search.trajectory=train`` selected.pt is the winner's training state at its last search step (``continues``),
which the stage's training continues, so the winner's search steps are not trained twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from jobs.config import RunCfg
from jobs.engine.checkpoint import load_checkpoint, save_checkpoint
from jobs.engine.pipeline import stage_candidates
from jobs.engine.records import CandidateResult, FailedRecord, RoundRanking, read_record
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


def _round_rows(
    cfg: RunCfg, run_dir: Path, stage: int, r: int, kept: list[Any]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Round ``r``'s rows (its members, scored in round r or failed) and its members' indices."""
    sd = RunDir(run_dir).stage(stage)
    if r == 1:
        members = list(range(len(kept)))
    else:
        ranking = read_record(RoundRanking, sd.round_json(r - 1))
        if ranking is None:
            raise SelectionError(f"stage {stage} search round {r - 1} is not ranked yet: nothing to select from")
        members = list(ranking.survivors)
    rows: list[dict[str, Any]] = []
    keys = (*SearchScore.INPUTS, *SearchScore.keys())
    for k in members:
        cand = kept[k]
        res = read_record(CandidateResult, sd.cand(k).result_json)
        if res is None or res.round < r:
            failed = read_record(FailedRecord, sd.cand(k).failed_json)  # the last attempt's failure, in any round
            why = failed.error if failed else f"no result of round {r} (task killed, still running or never started)"
            rows.append({"index": k, "name": cand.name, "status": "failed", "params": cand.spec.params(), "error": why})
            continue
        rows.append(
            {
                "index": k,
                "name": cand.name,
                "status": "done",
                "params": res.params,
                "round": r,
                "steps": res.steps,
                "estimator": res.estimator,
                **{x: getattr(res, x) for x in keys},
            }
        )
    return rows, members


def _rank(rows: list[dict[str, Any]], stage: int, r: int, needed: int) -> list[dict[str, Any]]:
    """The finished rows, best first (score, then fewer params, then index), each given its ``rank``."""
    ok = sorted((x for x in rows if x["status"] == "done"), key=lambda x: (x["score"], x["params"], x["index"]))
    if len(ok) < needed:
        failed = ", ".join(f"{x['index']}:{x['name']} ({x['error']})" for x in rows if x["status"] != "done")
        raise SelectionError(
            f"stage {stage} round {r}: only {len(ok)} of {len(rows)} candidates finished, search.min_successful="
            f"{needed}; missing: {failed}. Resubmit the run to rerun only those"
        )
    for rank, x in enumerate(ok, 1):
        x["rank"] = rank
    return ok


def _reason(ok: list[dict[str, Any]]) -> str:
    win = ok[0]
    if len(ok) == 1:
        return f"{win['name']} is the only candidate that finished"
    second = ok[1]
    describe = SearchScore.describe
    return f"{win['name']} has the lowest score {describe(win)}; runner-up {second['name']} {describe(second)}"


def run_select(cfg: RunCfg, stage: int, run_dir: Path, round: int | None = None) -> dict[str, Any]:
    """Rank round ``round`` of the stage's search (default: the last, ``search.rounds``).

    Before the last round this writes ``search/round_RR.json``: the best ``search.survivors(n)`` candidates
    train on in the next round. The last round writes selected.json + selected.pt and returns selected.json's
    content; its table lists every candidate, ranked by the round it reached (later first), then by its score
    there.

    Raises:
        SelectionError: stage t-1 not trained, an earlier round not ranked, or fewer than
            ``search.min_successful`` results in the round.
    """
    run_dir = Path(run_dir)
    rounds = cfg.search.rounds
    r = rounds if round is None else round
    if not 1 <= r <= rounds:
        raise SelectionError(f"stage {stage}: round {r} is not one of the search's rounds 1..{rounds} (search.rounds)")
    sd = RunDir(run_dir).stage(stage)
    done = read_json(sd.selected_json) if r == rounds else read_json(sd.round_json(r))
    if done is not None and (r < rounds or sd.selected_pt.exists()):
        logger.info("stage %d round %d already ranked", stage, r)
        return done
    found = stage_candidates(cfg, run_dir, stage)
    if found is None:
        raise SelectionError(f"stage {stage - 1} is not trained yet: nothing to select from")
    kept, _ = found
    rows, members = _round_rows(cfg, run_dir, stage, r, kept)
    ok = _rank(rows, stage, r, min(cfg.search.min_successful, len(rows)))  # a single-candidate stage needs only it
    if r < rounds:
        n = cfg.search.survivors(len(members))
        survivors = [x["index"] for x in ok[:n]]
        reason = (
            f"round {r} ({cfg.search.round_steps(r)} steps): {', '.join(x['name'] for x in ok[:n])} train on to step "
            f"{cfg.search.round_steps(r + 1)}; dropped: {', '.join(x['name'] for x in ok[n:]) or 'none'}"
            + (
                f"; failed: {', '.join(x['name'] for x in rows if x['status'] != 'done')}"
                if len(ok) < len(rows)
                else ""
            )
        )
        ranking = {
            "stage": stage,
            "round": r,
            "steps": cfg.search.round_steps(r),
            "survivors": survivors,
            "table": sorted(rows, key=lambda x: x["index"]),
            "reason": reason,
        }
        atomic_write_json(sd.round_json(r), ranking)
        logger.info("stage=%d search round %d ranked: %s", stage, r, reason)
        return ranking
    table = _final_table(cfg, run_dir, stage, kept, rows, ok)
    win = ok[0]
    reason = _reason(ok) + (f" (round {r} of {rounds}, {win['steps']} steps)" if rounds > 1 else "")
    result = read_record(CandidateResult, sd.cand(win["index"]).result_json)
    assert result is not None and result.grown is not None
    continues = result.checkpoint is not None  # search.trajectory=train: the winner's training state at its last step
    save_checkpoint(load_checkpoint(Path(result.checkpoint if continues else result.grown)), sd.selected_pt)
    selected = {
        "stage": stage,
        "winner": {"index": win["index"], "name": win["name"], "spec": result.spec, "score": win["score"]},
        "reason": reason,
        "table": table,
        "growth": result.growth,
        "init": str(sd.selected_pt),
        "failed": [x["index"] for x in table if x["status"] == "failed"],
        "score_formula": SearchScore.FORMULA,
        "rounds": rounds,
        "continues": continues,
        "start_step": int(result.steps or 0) if continues else 0,
    }
    atomic_write_json(sd.selected_json, selected)
    logger.info("stage=%d selected %s: %s", stage, win["name"], reason)
    if continues:
        logger.info("stage=%d the training continues %s's search state at step %d", stage, win["name"], result.steps)
    for line in growth_lines(stage, result.growth or {}):
        logger.info(line)
    return selected


def _final_table(
    cfg: RunCfg, run_dir: Path, stage: int, kept: list[Any], rows: list[dict[str, Any]], ok: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every candidate of the stage: the last round's rows, and those dropped after an earlier round with their
    last score; ``rank`` orders them all (the search's ranking, which the oracle grades)."""
    sd = RunDir(run_dir).stage(stage)
    by_index = {x["index"]: x for x in rows}
    ordered = list(ok)
    for r in range(cfg.search.rounds - 1, 0, -1):  # dropped after round r: ranked below everyone who went on
        ranking = read_record(RoundRanking, sd.round_json(r))
        assert ranking is not None
        for x in sorted(ranking.table, key=lambda x: (x.get("rank") or len(kept) + 1, x["index"])):
            if x["index"] in by_index:
                continue
            row = {**x, "dropped_after": r}
            by_index[x["index"]] = row
            if row["status"] == "done":
                ordered.append(row)
    for rank, x in enumerate(ordered, 1):
        x["rank"] = rank
    return sorted(by_index.values(), key=lambda x: x["index"])
