"""``python -m jobs export``: a checkpoint as a folder open_clip loads (issue #18) — R13 thin job.

The work is ``jobs.engine.export.export_open_clip``; this parses, prints the folder and maps failures to
exit codes (1 unusable checkpoint, 2 bad input: a model open_clip cannot express, no EMA, ``--out`` in the
way, no or the wrong tokenizer).
"""

from __future__ import annotations

import argparse

from data_tools.cli_errors import fail
from jobs.config import ConfigError
from jobs.engine.checkpoint import CheckpointError
from jobs.engine.export import ExportError, export_open_clip
from jobs.logs import setup_logging

__all__ = ["cmd_export"]

WEIGHTS = {"ema": "ema", "raw": "raw", "model": "raw"}  # "model": the name `evaluate --weights` uses


def cmd_export(args: argparse.Namespace) -> int:
    """Export ``--checkpoint`` to ``--out`` in ``--format``."""
    setup_logging(0)
    weights = WEIGHTS[args.weights] if args.weights else None
    try:
        summary = export_open_clip(
            args.checkpoint, args.out, weights=weights, tokenizer=args.tokenizer, force=args.force
        )
    except CheckpointError as exc:
        return fail(exc, 1)
    except (ExportError, ConfigError) as exc:
        return fail(exc, 2)
    print(summary.out)
    return 0
