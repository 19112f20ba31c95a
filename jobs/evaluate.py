"""``python -m jobs evaluate``: zero-shot classification and retrieval of one checkpoint — R13 thin job.

The work is ``jobs.engine.evaluate.evaluate_checkpoint``; this parses, writes the JSON (atomically
with ``--out``, else to stdout), each task's result in CLIP_benchmark's JSON (``--clip-benchmark-dir``,
default ``clip_benchmark/`` beside ``--out``) and maps failures to exit codes (1 unusable checkpoint, 2 bad
input).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.atomic import atomic_write_json
from data_tools.cli_errors import fail
from jobs.config import ConfigError, EvalCfg
from jobs.engine.checkpoint import CheckpointError
from jobs.engine.clip_benchmark import write_clip_benchmark
from jobs.engine.evaluate import evaluate_checkpoint
from jobs.engine.rundir import check_eval_output
from jobs.logs import setup_logging
from model.structs import apply_override, from_dict

__all__ = ["cmd_evaluate"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate ``--checkpoint`` on the eval suite of ``--data-root`` and the ``--task-dir`` folders."""
    setup_logging(0)
    # early, before the checkpoint is read: nothing to evaluate (a checkpoint's stored eval.task_dirs, or --set
    # eval.task_dirs, may still name tasks: then evaluate_model decides)
    if not (args.task_dir or args.checkpoint.is_file() or _has_eval_tasks(args.data_root)):
        print(
            f"error: {args.data_root}/eval/tasks.json not found and no dataset folder (with test/nshards.txt) in "
            f"{args.data_root}/eval: give a corpus with an eval suite (python -m data_tools build-offline "
            f"{args.data_root}) or --task-dir a CLIP_benchmark dataset",
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
            check_eval_output(args.out, cfg, args.data_root, args.checkpoint, args.weights, args.task_dir)
    except ConfigError as exc:
        return fail(exc, 2)
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data_root,
            cfg,
            weights=args.weights,
            task_dirs=args.task_dir,
            tokenizer=args.tokenizer,
        )
    except CheckpointError as exc:
        return fail(exc, 1)
    except ConfigError as exc:  # no tokenizer, or not the one the checkpoint was trained with
        return fail(exc, 2)
    except (ValueError, FileNotFoundError) as exc:  # a task folder that is not a usable dataset
        return fail(exc, 2)
    cb_dir = args.clip_benchmark_dir or (args.out.parent / "clip_benchmark" if args.out else None)
    if cb_dir is not None:
        try:
            write_clip_benchmark(result, cb_dir)
        except FileExistsError as exc:  # another checkpoint's result of the same file name
            return fail(exc, 2)
    if args.out:
        atomic_write_json(args.out, result)
        print(args.out)
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _has_eval_tasks(data_root: Path) -> bool:
    """``DATA_ROOT/eval`` holds a task (tasks.json or a dataset folder, as ``find_eval_tasks`` finds them)."""
    from data_tools.eval_sets import find_eval_tasks

    try:
        return bool(find_eval_tasks(data_root))
    except (OSError, ValueError):  # a task is there but unusable: evaluation names what is wrong
        return True
