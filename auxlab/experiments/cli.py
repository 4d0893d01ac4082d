"""``python -m auxlab.experiments``: parse the command line, run the experiment, print the summary."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from auxlab.experiments.config import ConfigError, _program, parse_args
from auxlab.experiments.run import run_experiment

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment a command line describes; returns the exit status.

    0 on success; 2, with one line on stderr, for an invalid config, missing data or another error
    that auxlab reports by a ValueError (e.g. ``psi[c]`` larger than a class for k-means).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    program = _program()
    try:
        config = parse_args(args)
    except ConfigError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    try:
        run_experiment(config, command=shlex.join([*program.split(), *args]))
    except (ConfigError, FileNotFoundError, ImportError, ValueError) as error:
        # auxlab's errors say what was wrong and how to fix it; run_experiment() from Python gives the traceback.
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    return 0
