"""The search oracle of a growth stage: every candidate trained fully, to grade the search (issue #15).

The search picks a stage's winner from short trainings (``jobs.engine.search``). How good that pick is
can only be measured by training every candidate the way the winner is trained and comparing:

1. ``run_oracle_candidate(cfg, stage, index, run_dir, env)`` (one SLURM array task) trains candidate
   ``index`` exactly as the stage's full training trains the winner: ``run_training(cfg, stage, ...,
   init=grown)`` with the run's own config (same ``train`` steps, data mixture with replay, seed) from
   the candidate's PIM-grown start (``search/cand_KK/grown.pt``, of which ``selected.pt`` is the
   winner's copy). The training lives in ``oracle/cand_KK/work/`` and resumes like any training
   (preemption: ``should_stop``). The chosen candidate is not trained again when the stage's own
   training has finished: that training IS its full training (same config, start and seed).
2. Each is evaluated on the eval suite (zero-shot top-1 per task, retrieval R@1 both ways) and on the
   stage's held-out split (symmetric InfoNCE and the caption-matching proxy, the same batches the
   search scores on); ``oracle/cand_KK/result.json`` is written atomically (idempotent: an existing
   one is the task done).
3. ``summarize_oracle`` writes ``oracle/summary.json``: one row per candidate (``name``,
   ``search_score``, ``search_rank``, ``val_loss``, ``mean_acc1``, ``i2t_R@1``, ``t2i_R@1``, params,
   FLOPs), ``kendall_tau`` of the search ranking against each full-training ranking (``val_loss``
   ascending, ``mean_acc1`` descending; tau-b, ties allowed) and ``regret_mean_acc1`` (the best
   candidate's mean zero-shot top-1 minus the chosen one's).

The oracle never changes the run's own results (``selected.json``, the stage's training and
evaluation): everything it writes is under ``stage_NN/oracle/``. Plain module: no submitit.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from jobs.config import RunCfg
from jobs.engine.dist import DistEnv
from jobs.engine.metrics import read_events
from jobs.engine.rundir import OracleSummary, RunDir, read_json, read_record

__all__ = [
    "ORACLE_FORMAT",
    "OracleError",
    "format_oracle",
    "kendall_tau",
    "oracle_plan",
    "oracle_status",
    "run_oracle_candidate",
    "summarize_oracle",
]

logger = logging.getLogger(__name__)

ORACLE_FORMAT = "growclip-oracle"


class OracleError(RuntimeError):
    """The stage is not ready for its oracle (no search results or no selection yet)."""


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b between two score lists over the same items (ties allowed); None if undefined."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"kendall_tau: {n} and {len(b)} scores; give one score per item in both")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else None


def oracle_plan(run_dir: Path, stage: int) -> list[dict[str, Any]]:
    """The stage's candidates the oracle trains: ``[{index, name, grown, search_score}, ...]``.

    Raises:
        OracleError: the stage's search has not been selected yet (the oracle grades a finished search).
    """
    sd = RunDir(run_dir).stage(stage)
    selected = read_json(sd.selected_json)
    if selected is None:
        raise OracleError(
            f"stage {stage} has no selected.json ({sd.path}); the oracle grades a finished search: run the stage's "
            "search and select first (python -m jobs submit ...)"
        )
    rows = []
    for row in selected["table"]:
        if row["status"] != "done":
            continue
        res = read_json(sd.cand(row["index"]).result_json)
        if res is None:  # selected.json lists it as done: its result cannot vanish unless deleted by hand
            raise OracleError(f"stage {stage} candidate {row['index']}: result.json is missing; re-run the search")
        rows.append({"index": row["index"], "name": row["name"], "grown": res["grown"], "search_score": row["score"]})
    return rows


def _stage_training(run_dir: Path, stage: int) -> tuple[Path | None, dict[str, Any] | None]:
    """The stage's own final.pt and eval metrics, when they exist."""
    sd = RunDir(run_dir).stage(stage)
    return (sd.final if sd.final.exists() else None), read_json(sd.eval_metrics)


def run_oracle_candidate(
    cfg: RunCfg,
    stage: int,
    index: int,
    run_dir: Path,
    env: DistEnv,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train candidate ``index`` of ``stage`` fully, evaluate it, write and return its result.

    Returns:
        ``oracle/cand_KK/result.json``'s content; ``{"status": "absent"}`` for an index beyond the stage's
        finished candidates; ``{"status": "preempted", "step": N}`` when ``should_stop`` stopped it.
    """
    from jobs.engine.evaluate import evaluate_checkpoint
    from jobs.engine.trainer import run_training
    from model.spec import ArchSpec

    run_dir = Path(run_dir)
    plan = oracle_plan(run_dir, stage)
    if index >= len(plan):
        return {"status": "absent", "index": index}
    cand = plan[index]
    sd = RunDir(run_dir).stage(stage)
    out = sd.oracle.cand(cand["index"])
    done = read_json(out.result_json)
    if done is not None:
        logger.info("stage %d oracle candidate %s already done", stage, cand["name"])
        return done
    selected = read_json(sd.selected_json) or {}
    chosen = selected.get("winner", {}).get("index") == cand["index"]
    t0 = time.time()
    try:
        curves = cfg.train.val_every > 0  # learning curves asked for: the chosen one needs its own as well
        final, metrics = _stage_training(run_dir, stage) if chosen and not curves else (None, None)
        reused = final is not None
        if final is None:
            result = run_training(cfg, stage, out.work, env, init=Path(cand["grown"]), should_stop=should_stop)
            if result.status == "preempted":
                logger.info("stage %d oracle candidate %s: preempted at step %d", stage, cand["name"], result.step)
                return {"status": "preempted", "stage": stage, "index": cand["index"], "step": result.step}
            if result.final is None:
                raise RuntimeError(f"oracle training stopped at step {result.step} ({result.status})")
            final = result.final
        if metrics is None or "val_loss_se" not in metrics.get("heldout", {}) or metrics.get("samples_seen") is None:
            # one pass over the model: eval suite + held-out split (a stage evaluated before these were recorded
            # is evaluated again here, its own metrics.json untouched)
            metrics = evaluate_checkpoint(final, cfg.data.root, cfg.eval, device=env.device, heldout=(cfg, stage))
        spec = ArchSpec.from_dict(metrics["spec"])
        val = metrics["heldout"]
        retrieval = [r for r in metrics["tasks"].values() if r["type"] == "retrieval"]
        samples = int(metrics["samples_seen"])

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        res = {
            "format": ORACLE_FORMAT,
            "status": "done",
            "stage": stage,
            "index": cand["index"],
            "name": cand["name"],
            "chosen": chosen,
            "reused_stage_training": reused,
            "search_score": cand["search_score"],
            "steps": int(metrics["step"]),
            "samples": samples,
            "params": spec.params(),
            "train_flops": spec.flops_per_sample() * samples,
            "val_loss": val["val_loss"],
            "val_loss_se": val.get("val_loss_se"),
            "val_acc1": val["proxy_acc1"],
            "val_samples": val["val_samples"],
            "mean_acc1": metrics["summary"]["mean_acc1"],
            "acc1": {k: r["acc1"] for k, r in metrics["tasks"].items() if r["type"] == "classification"},
            "i2t_R@1": mean([r["image_to_text_R@1"] for r in retrieval if "image_to_text_R@1" in r]),
            "t2i_R@1": mean([r["text_to_image_R@1"] for r in retrieval if "text_to_image_R@1" in r]),
            "final": str(final),
            "seconds": time.time() - t0,
        }
        if curves:  # step, held-out loss (+ se, EMA's, re-fitted temperature's) every train.val_every steps
            keys = ("step", "samples", "val_loss", "val_loss_se", "val_loss_ema", "val_loss_refit")
            train = RunDir(out.work).stage(stage).train
            res["curve"] = [
                {k: e[k] for k in keys if k in e}
                for e in read_events(train.events)
                if e.get("event") == "train" and "val_loss" in e
            ]
    except Exception as exc:
        if env.is_main:
            out.path.mkdir(parents=True, exist_ok=True)
            error = f"{type(exc).__name__}: {exc}"
            atomic_write_json(out.failed_json, {"error": error, "traceback": traceback.format_exc()})
        raise
    if env.is_main:
        atomic_write_json(out.result_json, res)
        out.failed_json.unlink(missing_ok=True)
    logger.info(
        "stage=%d oracle %s%s: val_loss %.4f mean_acc1 %.3f (%.0f s)",
        stage,
        cand["name"],
        " (chosen: the stage's own training)" if reused else "",
        res["val_loss"],
        res["mean_acc1"] or 0.0,
        res["seconds"],
    )
    return res


def summarize_oracle(run_dir: Path, stage: int) -> dict[str, Any]:
    """Write and return ``oracle/summary.json`` from the candidates' results (missing ones listed)."""
    run_dir = Path(run_dir)
    plan = oracle_plan(run_dir, stage)
    sd = RunDir(run_dir).stage(stage)
    selected = read_json(sd.selected_json) or {}
    ranks = {r["index"]: r.get("rank") for r in selected.get("table", [])}
    rows, missing = [], []
    for cand in plan:
        res = read_json(sd.oracle.cand(cand["index"]).result_json)
        if res is None:
            missing.append(cand["name"])
            continue
        rows.append(
            {
                "index": cand["index"],
                "name": cand["name"],
                "chosen": res["chosen"],
                "search_score": cand["search_score"],
                "search_rank": ranks.get(cand["index"]),
                **{k: res[k] for k in ("val_loss", "val_acc1", "mean_acc1", "i2t_R@1", "t2i_R@1", "acc1")},
                "val_loss_se": res.get("val_loss_se"),  # absent from results written before it was recorded
                **{k: res[k] for k in ("params", "train_flops", "steps", "seconds")},
            }
        )
    # the search's ranking: its rank (with rounds a candidate dropped early ranks below every survivor, whatever
    # its score); the score where a selection predates ranks
    ranked = all(r["search_rank"] is not None for r in rows)
    search = [r["search_rank"] if ranked else r["search_score"] for r in rows]
    acc = [r["mean_acc1"] for r in rows if r["mean_acc1"] is not None]
    chosen = next((r for r in rows if r["chosen"]), None)
    summary = {
        "format": ORACLE_FORMAT,
        "stage": stage,
        "chosen": chosen["name"] if chosen else None,
        "candidates": sorted(rows, key=lambda r: r["index"]),
        "missing": missing,
        # the search ranks by score ascending; full training by val_loss ascending and mean_acc1 descending
        "kendall_tau": {
            "val_loss": kendall_tau(search, [r["val_loss"] for r in rows]) if len(rows) > 1 else None,
            "mean_acc1": (kendall_tau(search, [-r["mean_acc1"] for r in rows]) if len(acc) == len(rows) > 1 else None),
        },
        "regret_mean_acc1": (
            max(acc) - chosen["mean_acc1"] if chosen is not None and chosen["mean_acc1"] is not None and acc else None
        ),
        "best_mean_acc1": max(rows, key=lambda r: r["mean_acc1"] or 0.0)["name"] if rows else None,
        "best_val_loss": min(rows, key=lambda r: r["val_loss"])["name"] if rows else None,
    }
    atomic_write_json(sd.oracle.summary_json, summary)
    tau = summary["kendall_tau"]
    logger.info(
        "stage=%d oracle: %d/%d candidates, kendall tau val_loss %s mean_acc1 %s, regret %s (chosen %s, best %s)",
        stage,
        len(rows),
        len(plan),
        tau["val_loss"],
        tau["mean_acc1"],
        summary["regret_mean_acc1"],
        summary["chosen"],
        summary["best_mean_acc1"],
    )
    return summary


def format_oracle(summary: dict[str, Any]) -> str:
    """The oracle table of one stage as text (also what ``report`` shows)."""

    def num(x: float | None, spec: str = ".4f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"stage {summary['stage']} oracle: every candidate trained fully (chosen by the search: {summary['chosen']})",
        f"  {'candidate':<24} {'search':>8} {'rank':>4} {'val_loss':>8} {'mean_acc1':>9} {'i2t_R@1':>7} "
        f"{'t2i_R@1':>7} {'params':>9} {'train_flops':>11}",
    ]
    for r in sorted(summary["candidates"], key=lambda r: r["search_rank"] or 0):
        lines.append(
            f"  {r['name'] + (' *' if r['chosen'] else ''):<24} {num(r['search_score']):>8} "
            f"{r['search_rank'] or '-':>4} {num(r['val_loss']):>8} {num(r['mean_acc1'], '.3f'):>9} "
            f"{num(r['i2t_R@1'], '.3f'):>7} {num(r['t2i_R@1'], '.3f'):>7} {r['params']:>9,d} {r['train_flops']:>11.3g}"
        )
    tau = summary["kendall_tau"]
    lines.append(
        f"  kendall tau (search vs full training): val_loss {num(tau['val_loss'], '+.2f')}, mean_acc1 "
        f"{num(tau['mean_acc1'], '+.2f')}; regret {num(summary['regret_mean_acc1'], '.3f')} mean zero-shot top-1 "
        f"(best: {summary['best_mean_acc1']})"
        + (f"; missing: {', '.join(summary['missing'])}" if summary["missing"] else "")
    )
    return "\n".join(lines)


def oracle_status(run_dir: Path, stage: int) -> str | None:
    """One line on the stage's oracle for ``status`` and ``plan``; None while the stage is not selected."""
    try:
        plan = oracle_plan(run_dir, stage)
    except OracleError:
        return None
    odir = RunDir(run_dir).stage(stage).oracle
    done = [c for c in plan if odir.cand(c["index"]).result_json.exists()]
    failed = [c["name"] for c in plan if odir.cand(c["index"]).failed_json.exists()]
    if not done and not failed and not odir.path.exists():
        return f"oracle: not run (python -m jobs oracle --run-dir {run_dir} --stage {stage})"
    line = f"oracle: {len(done)}/{len(plan)} candidates trained fully" + (
        f", failed: {', '.join(failed)}" if failed else ""
    )
    summary = read_record(OracleSummary, odir.summary_json)
    if summary is not None and len(done) == len(plan):
        tau = summary.kendall_tau or {}

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:+.2f}"

        line += (
            f"; kendall tau val_loss {num(tau.get('val_loss'))}, mean_acc1 {num(tau.get('mean_acc1'))}; regret "
            f"{'-' if summary.regret_mean_acc1 is None else format(summary.regret_mean_acc1, '.3f')}"
        )
    return line
