"""Memory stays flat (issue 15): no step keeps a graph, tensor or object of an earlier step alive, for every learning
strategy under every engine it uses (benchmarks/graph_lifetime.py; its results hold the long runs).

The live-tensor count is exact: a leak of one tensor per step (a kept loss, a retained graph's saved tensor, a list
that grows) shows as a difference of one per step between the two marks. Resident memory is compared within
1 MiB (the allocator's noise once warm); it is not measured where /proc is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import graph_lifetime

RESIDENT_TOLERANCE_MIB = 1.0


def _assert_flat(trace: graph_lifetime.Trace) -> None:
    (early, late), (rss_early, rss_late) = trace.tensors, trace.resident_mib
    assert late == early, f"{trace.case.name}: {late - early} more live tensors at step {trace.marks[1]} than at {trace.marks[0]}"
    if rss_early is not None and rss_late is not None:
        assert rss_late - rss_early <= RESIDENT_TOLERANCE_MIB, f"{trace.case.name}: resident memory grew {rss_late - rss_early:.2f} MiB"


@pytest.mark.parametrize("case", graph_lifetime.cases(), ids=lambda case: case.name.replace(" ", ""))
def test_live_tensors_and_memory_do_not_grow_over_100_steps(case: graph_lifetime.Case) -> None:
    _assert_flat(graph_lifetime.trace(case, marks=[10, 100]))


def test_the_paper_maxl_stays_flat_from_step_200_to_2000() -> None:
    _assert_flat(graph_lifetime.trace(graph_lifetime.Case("maxl"), marks=[200, 2000]))


def test_cases_cover_every_learning_strategy_and_engine() -> None:
    names = {case.name for case in graph_lifetime.cases()}
    assert {"maxl / jvp", "maxl / functional", "maxl / higher", "maxl / finite_difference", "rl / jvp", "random+maoal / jvp"} <= names
    assert {"maxl-light / jvp", "maxl-balanced / jvp", "maxl-light-balanced / jvp"} <= names
