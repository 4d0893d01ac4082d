"""Helpful against unhelpful manual auxiliary tasks: one table of several runner experiments (DTG-AuxL's framing).

Each row is a method; each column a scenario: the same primary task with a helpful manual auxiliary task
(e.g. Fashion-MNIST's coarse groups with the fine classes as human labels) and with an unhelpful one (the
same task with random sub-class labels). A method that does not read the manual task (STL, MAXL, DTG-AuxL)
has the same runs in both. Per cell: final test accuracy, mean +- standard error over seeds, and the gain
over STL (the row named by ``--baseline``) with the standard error of the difference of means; the step
cost, when given, is read from a step-cost benchmark's Markdown (ratio to a single-task step).

Usage::

    python -m benchmarks.auxiliary_scenarios --root runs \\
        --row "STL=coarse-balanced-adam/single" \\
        --row "Equal=coarse-balanced-adam/human|coarse-unhelpful-random/random~wrapper.step [random]" \\
        --step-cost benchmarks/results/step_cost/cpu_cnn_dtg_and_weightings.md --out results.md

A row is ``LABEL=RUN/STRATEGY`` (both scenarios) or ``LABEL=RUN/STRATEGY|RUN/STRATEGY`` (helpful|unhelpful;
``-`` for a scenario not run), optionally followed by ``~VARIANT``, the step-cost table's row.
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.label_learning import final_epochs, mean_se, records

SCENARIOS = ("helpful", "unhelpful")


@dataclass(frozen=True)
class Row:
    """A method: its label, the ``(run, strategy)`` of each scenario (None: not run), and its step-cost variant."""

    label: str
    cells: tuple[tuple[str, str] | None, ...]
    cost_variant: str | None


def parse_row(spec: str) -> Row:
    """``LABEL=RUN/STRATEGY[|RUN/STRATEGY][~VARIANT]`` as a :class:`Row`; a ValueError naming the spec otherwise."""
    label, sep, rest = spec.partition("=")
    if not sep or not label:
        raise ValueError(f"--row {spec!r}: expected LABEL=RUN/STRATEGY[|RUN/STRATEGY][~VARIANT]")
    rest, _, variant = rest.partition("~")
    parts = rest.split("|")
    if len(parts) == 1:
        parts = parts * len(SCENARIOS)
    if len(parts) != len(SCENARIOS):
        raise ValueError(f"--row {spec!r}: give one RUN/STRATEGY for both scenarios or one per scenario ({'|'.join(SCENARIOS)})")
    cells: list[tuple[str, str] | None] = []
    for part in parts:
        if part.strip() == "-":
            cells.append(None)
            continue
        run, slash, strategy = part.strip().partition("/")
        if not slash or not run or not strategy:
            raise ValueError(f"--row {spec!r}: {part!r} is not RUN/STRATEGY")
        cells.append((run, strategy))
    return Row(label.strip(), tuple(cells), variant.strip() or None)


def step_cost(path: Path, variant: str) -> str:
    """The ``ratio to single-task`` column of ``variant``'s row in a step-cost benchmark's Markdown."""
    lines = path.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| variant |"))
    column = [c.strip() for c in header.strip("|").split("|")].index("ratio to single-task")
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == variant:
            return f"{cells[column]}x"
    raise ValueError(f"{path}: no step-cost row {variant!r}")


@functools.cache
def _final_epochs(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The last epoch's record of each (strategy, seed) of a runner folder, read once however many cells name it."""
    return final_epochs(records(folder))


def accuracies(root: Path, run: str, strategy: str) -> list[float]:
    """Final test accuracy (%) of every seed of ``strategy`` in the runner folder ``root / run``."""
    final = _final_epochs(root / run)
    found = [100 * record["test_acc"] for (name, _), record in sorted(final.items()) if name == strategy]
    if not found:
        raise ValueError(f"{root / run}: no finished seed of strategy {strategy!r}")
    return found


def gain(values: Sequence[float], baseline: Sequence[float]) -> str:
    """Difference of means (pp) with the standard error of the difference, marked beyond 2 s.e."""
    if len(values) < 2 or len(baseline) < 2:
        return ""
    difference = statistics.fmean(values) - statistics.fmean(baseline)
    se = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(baseline) / len(baseline))
    return f"{difference:+.2f} ± {se:.2f}{' (> 2 s.e.)' if abs(difference) > 2 * se else ''}"


def table(root: Path, rows: Sequence[Row], baseline: str, cost_file: Path | None) -> str:
    """The Markdown table: per row and scenario, accuracy and gain over ``baseline``'s row; the step cost."""
    values = {row.label: [None if cell is None else accuracies(root, *cell) for cell in row.cells] for row in rows}
    if baseline not in values:
        raise ValueError(f"--baseline {baseline!r} is not a row's label ({', '.join(values)})")
    head = "| method | " + " | ".join(f"{s}: test acc. (%) | {s}: gain over {baseline} (pp)" for s in SCENARIOS) + " | seeds | step cost |"
    lines = [head, "|---|" + "---:|---:|" * len(SCENARIOS) + "---:|---:|"]
    for row in rows:
        cells = []
        for i, accs in enumerate(values[row.label]):
            base = values[baseline][i]
            if accs is None:
                cells += ["not run", ""]
                continue
            mean, se, n = mean_se(accs)
            cells += [f"{mean:.2f} ± {se:.2f}" if n > 1 else f"{mean:.2f}", "" if row.label == baseline or base is None else gain(accs, base)]
        seeds = "/".join(sorted({str(len(a)) for a in values[row.label] if a is not None}))
        cost = step_cost(cost_file, row.cost_variant) if cost_file is not None and row.cost_variant else ""
        same = row.cells[0] == row.cells[1]
        lines.append(f"| {row.label}{' (reads no manual task: the same runs)' if same else ''} | " + " | ".join(cells) + f" | {seeds} | {cost} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the folder of the runner's experiments (its --out)")
    parser.add_argument("--row", action="append", required=True, help="LABEL=RUN/STRATEGY[|RUN/STRATEGY][~VARIANT], once per method")
    parser.add_argument("--baseline", default="STL", help="the row the gains are measured against (default: STL)")
    parser.add_argument("--step-cost", type=Path, help="a step-cost benchmark's Markdown, for the rows that name a ~VARIANT")
    parser.add_argument("--out", type=Path, help="write the table here (Markdown), with the command")
    args = parser.parse_args(argv)
    text = table(args.root, [parse_row(spec) for spec in args.row], args.baseline, args.step_cost)
    print(text)
    if args.out is not None:
        command = "python -m benchmarks.auxiliary_scenarios " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Command: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
