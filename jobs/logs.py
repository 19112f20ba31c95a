"""Logging set-up for every job entry point (STYLE.md R11).

Library modules only do ``logger = logging.getLogger(__name__)``; the job entry point calls
:func:`setup_logging` once. Ranks other than 0 log warnings and errors only, so a 64-rank job prints
one progress stream, without patching ``print``.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def setup_logging(rank: int = 0, level: int | str | None = None) -> None:
    """Configure the root logger for this process.

    Args:
        rank: global rank of this process; non-zero ranks are limited to WARNING.
        level: log level of rank 0; default from ``$GROWCLIP_LOG_LEVEL`` or INFO.
    """
    if level is None:
        level = os.environ.get("GROWCLIP_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
