"""``python -m jobs evaluate``: zero-shot classification and retrieval of one checkpoint — R13 thin job.

The work is ``jobs.engine.evaluate.evaluate_checkpoint``; this parses, writes the JSON (atomically
with ``--out``, else to stdout) and maps failures to exit codes (1 unusable checkpoint, 2 bad input).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_tools.atomic import atomic_write_json
from data_tools.cli_errors import fail
from jobs.config import ConfigError, EvalCfg
from jobs.engine.checkpoint import CheckpointError
from jobs.engine.evaluate import evaluate_checkpoint
from jobs.engine.rundir import check_eval_output
from jobs.logs import setup_logging
from model.structs import apply_override, from_dict

__all__ = ["cmd_evaluate"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate ``--checkpoint`` on the eval suite of ``--data-root``."""
    setup_logging(0)
    if not (args.data_root / "eval" / "tasks.json").is_file():
        print(
            f"error: {args.data_root}/eval/tasks.json not found: --data-root must be a corpus with an eval suite "
            f"(python -m data_tools build-offline {args.data_root})",
            file=sys.stderr,
        )
        return 2
    cfg = None
    if args.overrides:
        raw: dict = {}
        try:
            for text in args.overrides:
                apply_override(raw, EvalCfg, text.removeprefix("eval."))
            cfg = from_dict(EvalCfg, raw)
        except ConfigError as exc:
            return fail(exc, 2)
    try:
        if args.out:
            check_eval_output(args.out, cfg, args.data_root, args.checkpoint, args.weights)
    except ConfigError as exc:
        return fail(exc, 2)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_root, cfg, weights=args.weights)
    except CheckpointError as exc:
        return fail(exc, 1)
    except ValueError as exc:
        return fail(exc, 2)
    if args.out:
        atomic_write_json(args.out, result)
        print(args.out)
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0
