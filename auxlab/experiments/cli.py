"""``python -m auxlab.experiments``: the command line, parsed into a config, run, its summary printed.

This is the only module of auxlab that uses ``argparse``. Every field of
:class:`~auxlab.experiments.config.ExperimentConfig` is a command-line option (``batch_size`` is
``--batch-size``); ``--config file.json`` loads a JSON object of fields first, ``--smoke`` applies
a seconds-long budget on top of it, and options given on the command line win over both::

    python -m auxlab.experiments --config base.json --smoke --strategies single,maxl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auxlab.engines import ENGINES
from auxlab.experiments.config import (
    AUTOCAST_DTYPES,
    DATASETS,
    GENERATOR_OPTIMIZERS,
    IMAGE_MODES,
    SCHEDULES,
    SMOKE,
    TASKS,
    ExperimentConfig,
    field_default,
    load_config,
)
from auxlab.experiments.conversion import field_type
from auxlab.experiments.errors import ConfigError
from auxlab.experiments.run import run_experiment

__all__ = ["build_parser", "main", "parse_args", "program_name"]

_CHOICES = {
    "dataset": DATASETS, "task": TASKS, "schedule": SCHEDULES, "image_mode": IMAGE_MODES, "generator_optimizer": GENERATOR_OPTIMIZERS,
    "autocast": AUTOCAST_DTYPES,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment a command line describes; returns the exit status.

    0 on success; 2, with one line on stderr, for an invalid config, missing data or another error
    that auxlab reports by a ValueError (e.g. ``psi[c]`` larger than a class for k-means).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    program = program_name()
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


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    """The config of a command line: defaults, then ``--config FILE``, then ``--smoke``, then the options given.

    Raises:
        ConfigError: a value is invalid (the message names the field).
        SystemExit: the command line itself is malformed (unknown option), or ``--help``.
    """
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        values.update(load_config(config_file))
    if args.pop("smoke", False):
        values.update(SMOKE)
    values.update(args)
    return ExperimentConfig.from_dict(values)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: one option per config field, plus ``--config`` and ``--smoke``.

    Every option defaults to "not given" (``argparse.SUPPRESS``), so that :func:`parse_args` can
    tell what the command line set; the help shows each field's real default.
    """
    prog = prog or program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare auxiliary-label strategies (single task, random, k-means, human, MAXL, SLA, RL labels, DTG-AuxL, each fixed one "
        "optionally with a weighting of the auxiliary loss: gcs, uncertainty, maoal) on one dataset and model, over several seeds: "
        "per-epoch metrics, a summary table of final test accuracy and plots.",
        epilog=f"Example: {prog} --dataset digits --strategies single,maxl --seeds 0,1,2 --epochs 10 --out runs/",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON file of config fields, applied before the options below")
    parser.add_argument("--smoke", action="store_true", help=f"tiny budget to check that it runs: {', '.join(f'{k}={_shown(v)}' for k, v in SMOKE.items())}")
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        text = f"{f.metadata.get('help', '')} (default: {_shown_default(f.name)})"
        if hints[f.name] is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, metavar=_metavar(f.name, hints[f.name]), help=text)
    return parser


def program_name() -> str:
    """``python -m auxlab.experiments``, or the name of the console script that runs it."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m auxlab.experiments" if script in ("", "__main__.py", "-c") or script.endswith(".py") else script


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_default(name: str) -> str:
    value = field_default(name)
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _metavar(name: str, annotation: Any) -> str:
    if name == "engine":
        return "{" + ",".join(sorted(ENGINES)) + "}"
    if name in _CHOICES:
        return "{" + ",".join(_CHOICES[name]) + "}"
    kind = field_type(annotation)
    if typing.get_origin(kind) is tuple:
        return "N[,N...]" if typing.get_args(kind)[0] is int else "NAME[,NAME...]"
    return {int: "N", float: "X", str: "TEXT"}.get(kind, "JSON")


def _shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
