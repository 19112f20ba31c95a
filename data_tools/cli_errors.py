"""How both command lines (``python -m data_tools``, ``python -m jobs``) end on bad input: ONE line.

Every error a user can cause ends in ``error: <what> (<where>); <fix>`` on stderr and exit 2 (bad input)
or 1 (a job that ran and failed), never a traceback (issue #14). Argument errors too: argparse's usage
block plus ``prog: error: ...`` becomes one line that points at ``--help``. An exception nobody
anticipated is still one line, naming its type; ``GROWCLIP_TRACEBACK=1`` prints the traceback first.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "OneLineParser", "fail", "one_line", "unexpected"]

EXIT_FAILED, EXIT_USAGE = 1, 2


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def fail(message: object, code: int = EXIT_USAGE) -> int:
    """Print ``error: message`` as one line on stderr; return ``code`` (for ``return fail(...)``)."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def unexpected(exc: BaseException, where: str) -> int:
    """One line for an exception no check anticipated (a bug, or an input not validated yet): exit 1."""
    if os.environ.get("GROWCLIP_TRACEBACK"):
        traceback.print_exception(exc)
    return fail(
        f"{type(exc).__name__}: {exc} ({where}); an unexpected failure: re-run with GROWCLIP_TRACEBACK=1 for the "
        "traceback and report it with the command line",
        EXIT_FAILED,
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one ``error:`` line naming the verb and ``--help`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {one_line(message)} ({self.prog}); see {self.prog} --help", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
