"""Thin entries of ``python -m jobs report`` and ``python -m jobs runs`` (the work is in jobs/engine/).

``report RUN_DIR``: the per-stage text summary on stdout (what ``submit`` prints when it finishes).
``report RUN_DIR [RUN_DIR ...] --out DIR [--format md|html|json|csv]``: the full report — tables,
plots, and for several runs a side-by-side comparison (``jobs.engine.report``).
``runs RUN_ROOT``: one line per run; the SLURM queue and accounting are asked here, once for all runs
(``jobs.engine.runs`` stays free of SLURM commands).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from data_tools.cli_errors import fail

__all__ = ["cmd_report", "cmd_runs"]


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of one or more runs to ``--out`` (or print the text summary of one run)."""
    from jobs.engine.report import ReportError, format_report, write_report

    try:
        if args.out is None:
            if len(args.run_dirs) != 1 or args.format is not None:
                print(
                    "error: several run dirs or --format need --out DIR, e.g. "
                    "python -m jobs report runs/a runs/b --out reports/ab --format html",
                    file=sys.stderr,
                )
                return 2
            print(format_report(args.run_dirs[0]))
            return 0
        written = write_report(args.run_dirs, args.out, args.format or "md")
    except ReportError as exc:
        return fail(exc, 2)
    main = next((p for p in written if p.name.startswith("report.")), None)
    print(f"wrote {len(written)} files to {args.out}" + (f"; open {main}" if main else ""))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """One line per run under RUN_ROOT: name, stages done/planned, state, last update."""
    from jobs.engine.runs import find_runs, format_runs, run_line, slurm_job_ids

    try:
        dirs = find_runs(args.run_root)
    except ValueError as exc:
        return fail(exc, 2)
    if not dirs:
        print(f"no runs under {args.run_root} (a run dir has config.yaml, plan.json or stage_NN/)")
        return 0
    ids = [j for d in dirs for j in slurm_job_ids(d)]
    queued = ended = None
    if ids and shutil.which("squeue"):
        from jobs.submit import accounting_states, queue_states

        queued = {j: state for j, (state, _) in queue_states(ids).items()}
        ended = accounting_states([j for j in ids if j not in queued]) if shutil.which("sacct") else {}
    print(format_runs([run_line(d, queued, ended) for d in dirs]))
    return 0
