"""``python -m data_tools <verb>``: tools that turn crawled image-text pairs into growing shards.

Only verbs that work are registered. The shard tools (``ingest``, ``validate``, ``stats``,
``build-offline``) arrive with issue #4; until then this command has no verbs and says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "VERBS"]

# verb name -> (one-line help, function that adds its arguments and sets ``func``)
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools",
        description="GrowCLIP data tools: crawled image-text pairs -> growing webdataset shards.",
        epilog=None if VERBS else "No verbs are available yet in this version.",
    )
    if VERBS:
        sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
        for name, (help_text, configure) in VERBS.items():
            configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the verb; returns the exit code (0 ok, 1 failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not VERBS:
        parser.print_help()
        return 2
    return args.func(args)
