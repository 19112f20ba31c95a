"""Offline analysis of growth runs (``python -m jobs report``): tables and plots read from run dirs only.

Nothing here runs a model: every number comes from the files the jobs wrote, and finished, running
and failed runs all load (damage becomes ``warnings``, never an exception). The modules, in the order
the data flows:

* :mod:`~jobs.engine.report.read`: tolerant readers of a run dir's markers and logs, one stage's
  training and search condensed; :class:`ReportError` for a path that is not a run dir;
* :mod:`~jobs.engine.report.load`: :func:`load_run`, one run as a JSON-ready dict (the ``json``
  format writes it as it is; its docstring defines compute, wall time, GPU-hours and the losses);
* :mod:`~jobs.engine.report.compare`: :func:`compare_runs`, several side by side, including their
  metrics *at equal compute*;
* :mod:`~jobs.engine.report.blocks`: the typed blocks (:class:`Heading`, :class:`Paragraph`,
  :class:`BulletList`, :class:`Table`, :class:`Image`) and :func:`render_markdown` / :func:`render_html`;
* :mod:`~jobs.engine.report.sections`: :func:`report_blocks`, the report's content as blocks;
* :mod:`~jobs.engine.report.write`: :func:`write_report` (md/html/json/csv plus the PNG plots of
  :mod:`jobs.engine.plots`) and :func:`format_report`, the text summary ``submit`` prints.

Everything public is importable from here, as when this package was one module.
"""

from __future__ import annotations

from jobs.engine.report.blocks import (
    Block,
    BulletList,
    Heading,
    Image,
    Paragraph,
    Table,
    markdown_table,
    render_html,
    render_markdown,
)
from jobs.engine.report.compare import COMPARE_METRICS, compare_runs, interpolate_at
from jobs.engine.report.compare import _labels as _labels  # the run labels of a report (tests import it from here)
from jobs.engine.report.load import COMPUTE_NOTE, REPORT_FORMAT, VAL_LOSS_NOTE, load_run, tower_params
from jobs.engine.report.read import ReportError
from jobs.engine.report.sections import comparison_blocks, report_blocks
from jobs.engine.report.write import FORMATS, csv_tables, format_report, plot_files, stage_rows, write_report

__all__ = [
    "FORMATS",
    "REPORT_FORMAT",
    "COMPUTE_NOTE",
    "VAL_LOSS_NOTE",
    "COMPARE_METRICS",
    "ReportError",
    "load_run",
    "tower_params",
    "compare_runs",
    "interpolate_at",
    "stage_rows",
    "format_report",
    "Block",
    "Heading",
    "Paragraph",
    "BulletList",
    "Table",
    "Image",
    "report_blocks",
    "comparison_blocks",
    "render_markdown",
    "render_html",
    "markdown_table",
    "plot_files",
    "csv_tables",
    "write_report",
]
