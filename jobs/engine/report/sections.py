"""The report's content as blocks (:mod:`jobs.engine.report.blocks`): :func:`report_blocks`.

Per run: its stages (architecture, compute, losses, evaluation), search candidates, the search
oracle's verdict where there is one, growth events, kernels and plots; for several runs first the
side-by-side comparison of :func:`comparison_blocks` (from :func:`jobs.engine.report.compare.compare_runs`).
"""

from __future__ import annotations

import json
from typing import Any

from jobs.engine.report.blocks import Block, BulletList, Heading, Image, Paragraph, Table, _num
from jobs.engine.report.compare import COMPARE_METRICS, _labels, compare_runs


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
    return [Table(head, rows), Table(head2, rows2)]


def _search_table(rows: list[dict[str, Any]]) -> Table:
    head = ["cand", "name", "status", "params", "cost", "cost ratio", "round", "steps", "val_loss", "proxy_acc1"]
    head += ["score"]
    head += ["rank", "winner", "first search loss", "search FLOPs", "seconds", "preempted", "failure"]
    out = [
        [
            f"{c['index']:02d}",
            c["name"],
            c["status"],
            _num(c["params"], "params"),
            _num(c["cost"], "g3"),
            _num(c["cost_ratio"], "f3"),
            _num(c["round"], "int"),
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
    return Table(head, out)


def _oracle_blocks(summaries: list[dict[str, Any]]) -> list[Block]:
    """Per stage with an oracle (``jobs oracle``): Kendall tau, regret and every candidate's full training."""
    blocks: list[Block] = []
    for o in summaries:
        tau = o["kendall_tau"]
        blocks.append(
            Paragraph(
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
        blocks.append(Table(head, rows))
    return blocks


def _growth_table(growth: list[dict[str, Any]]) -> Table:
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
    return Table(head, rows)


def _kernel_block(kernels: dict[str, dict[str, str]]) -> Block:
    if not kernels:
        return Paragraph("No kernel report logged yet (the trainer's start event names them).")
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
    return Table(["kernel", *cols], rows)


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
        Heading(2, "Comparison"),
        Paragraph(
            "Last evaluated stage of each run (zero-shot top-1 per task and mean; retrieval R@1 mean over "
            "retrieval tasks).",
        ),
        Table(head, rows),
        Heading(3, "At equal compute"),
    ]
    if eq["flops"] is None:
        blocks.append(Paragraph("Not available: a run has no evaluated stage yet."))
    else:
        blocks.append(Paragraph(f"Metrics at {eq['flops']:.4g} FLOPs — {eq['method']}."))
        blocks.append(
            Table(
                ["run", "mean acc1 @ equal compute", "i2t R@1 @ equal compute", "t2i R@1 @ equal compute", "note"],
                [[r["run"], *(_num(r[m], "f3") for m in COMPARE_METRICS), r["note"] or ""] for r in eq["rows"]],
            )
        )
    return blocks


def report_blocks(runs: list[dict[str, Any]], plots: dict[str, str] | None = None) -> list[Block]:
    """The report as a list of blocks (headings, paragraphs, tables, images) that md and html render."""
    blocks: list[Block] = [Heading(1, "GrowCLIP run report")]
    blocks.append(
        Paragraph(f"{len(runs)} run(s), read from their run dirs only (JSON markers, events.jsonl; no model was run).")
    )
    if len(runs) > 1:
        blocks += comparison_blocks(compare_runs(runs))
    if plots and "zeroshot_vs_compute" in plots:
        blocks.append(Image(f"plots/{plots['zeroshot_vs_compute']}", "zero-shot mean acc1 vs cumulative compute"))
    for run, label in zip(runs, _labels(runs), strict=True):
        blocks.append(Heading(2, f"Run {label}"))
        blocks.append(
            Paragraph(
                f"{run['run_dir']} — stages evaluated {run['stages_done']}/{run['stages_planned']}"
                + (f", seed {run['seed']}" if run.get("seed") is not None else ""),
            )
        )
        if run["warnings"]:
            blocks.append(Paragraph("Warnings (reported, not fatal):"))
            blocks.append(BulletList(run["warnings"]))
        blocks.append(Heading(3, "Stages"))
        blocks += _stage_tables(run)
        blocks.append(BulletList(run["notes"]))
        blocks.append(Heading(3, "Search"))
        stages_with_search = sorted({c["stage"] for c in run["search"]})
        if not stages_with_search:
            blocks.append(Paragraph("No search yet (stage 1 trains the config's model)."))
        for t in stages_with_search:
            rows = [c for c in run["search"] if c["stage"] == t]
            failed = [c for c in rows if c["status"] != "done"]
            blocks.append(
                Paragraph(
                    f"Stage {t}: {len(rows)} candidates, {len(rows) - len(failed)} scored, {len(failed)} without "
                    "a result; lower score wins.",
                )
            )
            blocks.append(_search_table(rows))
        if run.get("oracle"):
            blocks.append(Heading(3, "Search fidelity (oracle)"))
            blocks += _oracle_blocks(run["oracle"])
        blocks.append(Heading(3, "Growth events"))
        blocks.append(_growth_table(run["growth"]) if run["growth"] else Paragraph("No growth event yet."))
        blocks.append(Heading(3, "Kernels used"))
        blocks.append(_kernel_block(run["kernels"]))
        if plots:
            blocks.append(Heading(3, "Plots"))
            for kind, alt in (
                ("loss", "training loss vs samples seen, growth events marked"),
                ("arch", "architecture timeline: params per tower per stage"),
                ("search", "search: cost vs score, winner marked"),
            ):
                if f"{label}/{kind}" in plots:
                    blocks.append(Image(f"plots/{plots[f'{label}/{kind}']}", alt))
    return blocks
