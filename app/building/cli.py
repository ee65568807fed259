"""What the model-building commands share on the command line: one-line errors with exit status 2,
argument parsers that show every default and take no abbreviations, the thread default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from app.core.logs import quiet_library_warnings

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the person running a command: reported in one line, exit status 2."""


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose `--help` shows every default and which refuses abbreviated
    options (`--epoch 1` must not quietly mean `--epochs 1`)."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0], allow_abbrev=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_threads(parser_: argparse.ArgumentParser, what: str) -> None:
    parser_.add_argument("--threads", type=int, default=None, help=f"threads for {what} (default: all cores)")


def threads_or_all(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def run_command(main: Callable[[], int]) -> int:
    """Run a command's body: library warnings kept out of its output, and a `UsageError` (or an
    `OSError` such as a read-only folder) printed as one line with exit status 2."""
    quiet_library_warnings()
    try:
        return main()
    except (UsageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
