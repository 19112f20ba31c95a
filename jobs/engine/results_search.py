"""The search's sections of docs/results.md (issues #15, #17): the oracle's grade of every graded run, the search
estimators graded on the oracle's learning curves (``jobs fidelity``), and per seed why GrowCLIP did or did not
beat the fixed architectures. Read from the aggregate of :func:`jobs.engine.results.aggregate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.offline import growth_mode
from jobs.config import load_cfg
from jobs.engine.report import markdown_table
from jobs.engine.rundir import RunDir, read_json

__all__ = ["search_sections"]


def search_sections(agg: dict[str, dict[str, Any]], graded: Sequence[Path] = ()) -> list[str]:
    """The three sections' markdown lines (the estimators and why-not sections only where there is data).

    ``graded``: more run dirs whose ``jobs fidelity`` grades join the estimator tables (e.g. a study on another
    corpus than the suite's)."""
    return _fidelity(agg) + _estimators(agg, graded) + _why(agg)


def _spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return f"{(max(vals) - min(vals)) * 100:.1f}" if vals else "-"


def _fidelity(agg: dict[str, dict[str, Any]]) -> list[str]:
    """The "search fidelity" section: per graded run and stage, the oracle's Kendall tau and regret."""
    rows = []
    for name, e in agg.items():
        for r in e["runs"]:
            for o in r["loaded"].get("oracle", []):
                tau = o["kendall_tau"]
                rows.append(
                    [
                        name,
                        str(r["seed"]),
                        str(o["stage"]),
                        str(len(o["candidates"])) + (f" ({len(o['missing'])} missing)" if o["missing"] else ""),
                        str(o["chosen"]),
                        f"{o['best_mean_acc1']} / {o['best_val_loss']}",
                        "-" if tau["val_loss"] is None else f"{tau['val_loss']:+.2f}",
                        "-" if tau["mean_acc1"] is None else f"{tau['mean_acc1']:+.2f}",
                        "-" if o["regret_mean_acc1"] is None else f"{o['regret_mean_acc1'] * 100:.1f}",
                        _spread([c["mean_acc1"] for c in o["candidates"]]),
                    ]
                )
    if not rows:
        return [
            "## Search fidelity (oracle)",
            "",
            "No oracle yet: `python -m jobs oracle --run-dir RUN --stage T` (or an `oracle_of` experiment) trains "
            "every candidate of a stage fully and grades the search against it.",
            "",
        ]
    head = ["run", "seed", "stage", "candidates", "chosen by the search", "best by zero-shot / by held-out loss"]
    head += ["tau (held-out loss)", "tau (zero-shot)", "regret (points)", "zero-shot spread (points)"]
    return [
        "## Search fidelity (oracle)",
        "",
        "Every candidate of a stage trained fully, exactly as the winner's full training (`python -m jobs oracle`),"
        " then ranked by held-out InfoNCE (ascending) and mean zero-shot top-1 (descending). Kendall tau (tau-b)"
        " compares the search's ranking with each: +1 = the search orders the candidates as full training does, 0 ="
        " no better than chance. Regret = best candidate's mean zero-shot top-1 minus the chosen one's.",
        "",
        markdown_table(head, rows),
        "",
    ]


def _estimators(agg: dict[str, dict[str, Any]], more: Sequence[Path]) -> list[str]:
    """The "search estimators" section: ``jobs fidelity`` of every graded run and stage (``oracle/fidelity.json``),
    tau and regret per estimator and budget averaged over seeds and stages, and the successive-halving replays;
    one group of rows per corpus (its data root and how it grows)."""
    graded: dict[tuple[str, str, int], list[dict[str, Any]]] = {}  # (corpus, estimator, budget) -> rows
    halving: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    run_dirs = [Path(r["loaded"]["run_dir"]) for e in agg.values() for r in e["runs"]]
    for run_dir in dict.fromkeys(d.resolve() for d in [*run_dirs, *more]):  # a run given twice counts once
        root = load_cfg(RunDir(run_dir).config_yaml).data.root
        corpus = f"{root.name} ({growth_mode(root)})"
        for sd in RunDir(run_dir).stages():
            rep = read_json(RunDir(run_dir).stage(sd).oracle.path / "fidelity.json")
            for row in (rep or {}).get("grade", []):
                graded.setdefault((corpus, row["estimator"], row["budget"]), []).append(row)
            for row in (rep or {}).get("halving", []):
                sched = f"{row['steps']} steps, keep {row['keep']:g}, {row['rounds']} rounds"
                halving.setdefault((corpus, sched, row["estimator"]), []).append(row)
    if not graded:
        return []

    def mean(rows: list[dict[str, Any]], key: str, scale: float = 1.0, fmt: str = "+.2f") -> str:
        vals = [x[key] * scale for x in rows if x.get(key) is not None]
        return format(sum(vals) / len(vals), fmt) if vals else "-"

    head = ["corpus", "estimator", "budget (steps)", "n", "tau (held-out loss)", "tau (zero-shot)", "regret (points)"]
    rows = [
        [c, m, str(b), str(len(v)), mean(v, "tau_val_loss"), mean(v, "tau_mean_acc1")]
        + [mean(v, "regret_mean_acc1", 100, ".1f")]
        for (c, m, b), v in sorted(graded.items())
    ]
    head2 = ["corpus", "successive halving", "estimator", "n", "tau (held-out loss)", "tau (zero-shot)"]
    head2 += ["regret (points)", "overhead (losers' FLOPs / training)"]
    rows2 = [
        [c, sched, m, str(len(v)), mean(v, "tau_val_loss"), mean(v, "tau_mean_acc1"),
         mean(v, "regret_mean_acc1", 100, ".1f"), mean(v, "overhead", 1.0, ".2f")]
        for (c, sched, m), v in sorted(halving.items())
    ]  # fmt: skip
    return [
        "## Search estimators (oracle learning curves, `jobs fidelity`)",
        "",
        "Under `search.trajectory: train` a search round that ends at step b sees the first b steps of the"
        " candidate's full training, so the oracle's learning curves (held-out loss every log step, and an EMA's)"
        " grade every estimator at every budget without another training: `loss` = held-out loss at step b, `ema` ="
        " the EMA weights' (decay 0.99), `extrapolate` = a power law fitted to the curve up to b and evaluated at"
        " train.steps, `refit` = the held-out loss at the temperature re-fitted on the held-out batches (curves"
        " recorded before it existed show none). Means over seeds and stages (n); tau against the full trainings'"
        " held-out loss and zero-shot ranking; regret = best candidate's mean zero-shot top-1 minus the estimator's"
        " pick's.",
        "",
        markdown_table(head, rows),
        "",
        "Successive halving replayed on the same curves (round r ranks at steps / keep^(r-1); the winner's steps"
        " are its training's, so the overhead is the other candidates' steps in FLOPs over the winner's training):",
        "",
        markdown_table(head2, rows2),
        "",
    ]


def _why(agg: dict[str, dict[str, Any]]) -> list[str]:
    """Per seed: GrowCLIP's last stage against the best fixed baseline and the oracle's best candidate of that
    stage: did the search find the best growth, and would even the best growth have beaten the fixed model?"""
    g = agg.get("growclip")
    fixed = {n: {r["seed"]: r["final"] for r in agg[n]["runs"]} for n in ("fixed_small", "fixed_final") if n in agg}
    if not g or not fixed:
        return []
    rows = []
    for r in sorted(g["runs"], key=lambda r: r["seed"]):
        last = max(
            (o for o in r["loaded"].get("oracle", []) if not o["missing"]), key=lambda o: o["stage"], default=None
        )
        mine = {n: f[r["seed"]] for n, f in fixed.items() if r["seed"] in f}
        if last is None or not mine:
            continue
        best_fixed = max(mine, key=lambda n: mine[n]["mean_acc1"] or -1.0)
        cands = last["candidates"]
        best = max(cands, key=lambda c: c["mean_acc1"] or -1.0)
        best_loss = min(c["val_loss"] for c in cands)
        fin = r["final"]
        rows.append(
            [
                str(r["seed"]),
                f"{fin['mean_acc1'] * 100:.1f} / {fin['heldout_loss']:.3f}" if fin.get("heldout_loss") else "-",
                f"{best['mean_acc1'] * 100:.1f} ({best['name']}) / {best_loss:.3f}",
                f"{mine[best_fixed]['mean_acc1'] * 100:.1f} ({best_fixed}) / "
                + (f"{mine[best_fixed]['heldout_loss']:.3f}" if mine[best_fixed].get("heldout_loss") else "-"),
                "yes"
                if last["chosen"] == best["name"]
                else f"no ({last['chosen']}, regret {(last['regret_mean_acc1'] or 0) * 100:.1f})",
                "yes" if best["mean_acc1"] > mine[best_fixed]["mean_acc1"] else "no",
            ]
        )
    if not rows:
        return []
    head = ["seed", "growclip: zero-shot / held-out loss", "oracle's best candidate, last stage", "best fixed"]
    head += ["search found the best?", "best growth beats best fixed (zero-shot)?"]
    return [
        "## Why (not): GrowCLIP against the fixed architectures, with the oracle",
        "",
        "Per seed, the last stage: GrowCLIP as run, the best of its candidates when every one is trained fully (the"
        " oracle, zero-shot percent / lowest held-out loss), and the better fixed baseline at equal compute. If the"
        " oracle's best does not beat the fixed model, no search could have made GrowCLIP win here: the limit is"
        " growth itself at this scale and compute, not the search.",
        "",
        markdown_table(head, rows),
        "",
    ]
