"""One run dir as the report's data: :func:`load_run` (and :func:`tower_params` for its parameter columns).

Nothing here runs a model: every number comes from the files the jobs wrote (DESIGN.md "On disk") —
``config.yaml``, ``stage_NN/train/{spec.json, events.jsonl}``, ``stage_NN/eval/metrics.json``,
``stage_NN/search/{candidates.json, cand_KK/{result.json, failed.json, growth.json, events.jsonl,
work/stage_NN/train/events.jsonl}}``, ``stage_NN/selected.json`` and ``stage_NN/oracle/summary.json``
(read by :mod:`jobs.engine.report.read`) — plus ``model.spec.ArchSpec`` for parameter and FLOP counts.
Finished, running and failed runs all load: a cut-off last JSONL line (a job killed mid-write, or
writing now), a missing stage, a missing evaluation or a failed candidate become entries in
``warnings`` and empty cells, never an exception. Definitions (also printed in every report):

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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.eval_sets import CLASSIFICATION, RETRIEVAL
from jobs.engine.autopilot import autopilot_stages
from jobs.engine.pipeline import arch_summary
from jobs.engine.report.read import _check_run_dir, _config, _json, _search_part, _train_part
from jobs.engine.rundir import RunDir
from model.spec import ArchSpec, block_params

REPORT_FORMAT = "growclip-report"

COMPUTE_NOTE = (
    "compute = cumulative training FLOPs (ArchSpec.flops_per_sample(), forward+backward estimate, x samples "
    "trained; search candidates included, evaluation excluded)"
)
VAL_LOSS_NOTE = (
    "val_loss = InfoNCE on stage t's held-out split of the search winner after its short search training "
    "(result.json); stage 1 has no search"
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


def _retrieval(tasks: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        name: {k: v for k, v in r.items() if k.startswith(("image_to_text_R@", "text_to_image_R@"))}
        for name, r in tasks.items()
        if r.get("type") == RETRIEVAL
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
    rd = RunDir(run_dir)
    plan = _json(rd.plan_json, run_dir, warnings) or {}
    found = rd.stages()
    planned = int((cfg.get("data") or {}).get("stages") or 0) or max([*plan.get("stages", []), *found, 0])
    compute = _compute_model(cfg)
    stages, search_rows, growth, kernels, curve, oracles = [], [], [], {}, [], []
    cum_flops, cum_hours, cum_samples = 0, 0.0, 0
    prev: dict[str, Any] | None = None
    last_found = max(found, default=0)
    made = autopilot_stages(rd.autopilot)
    for t in range(1, max(planned, last_found) + 1):
        sd = rd.stage(t)
        row: dict[str, Any] = {"stage": t, "status": "not started", "chosen": None, "arch": None, "spec": None,
                               "autopilot": t in made}  # fmt: skip
        if not sd.path.is_dir():
            if t < last_found:
                row["status"] = "missing"
                warnings.append(f"stage_{t:02d}/ is missing although later stages exist (deleted or moved?)")
            stages.append(row)
            prev = None
            continue
        tr = _train_part(sd.train, run_dir, warnings)
        cands = _search_part(sd, run_dir, warnings) if t > 1 else []
        sel = _json(sd.selected_json, run_dir, warnings) if t > 1 else None
        ev = _json(sd.eval_metrics, run_dir, warnings)
        spec_json = tr["spec"] or (sel["winner"]["spec"] if sel else None)
        if spec_json is None and t == 1 and isinstance(cfg.get("model"), dict):
            spec_json = cfg["model"]
        spec = ArchSpec.from_dict(spec_json) if spec_json else None
        win = next((c for c in cands if c["winner"]), None)
        done_cands = [c for c in cands if c["status"] == "done"]
        # the winner's search steps are the first steps of the stage's training when it continues them
        # (search.trajectory=train): counted there, so the search's overhead is the other candidates' compute
        continues = bool(sel and sel.get("continues"))
        search_flops = sum(int(c["train_flops"] or 0) for c in done_cands if not (continues and c["winner"]))
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
        acc1 = {n: r["acc1"] for n, r in sorted(tasks.items()) if r.get("type") == CLASSIFICATION and "acc1" in r}
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
            search_overhead=search_flops / train_flops if train_flops and t > 1 else None,
            search_rounds=int(sel.get("rounds", 1)) if sel else None,
            continues=continues,
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
        oracle = _json(sd.oracle.summary_json, run_dir, warnings) if t > 1 else None
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
            record = _json(sd.cand(win["index"]).growth_json, run_dir, warnings)
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
