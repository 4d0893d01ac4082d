"""Memory stays flat over a long run: no step keeps a graph, a tensor or a Python object of an earlier one alive.

For every learning strategy (every registered generator and weighting whose wrapper has a meta learner) under
every engine it uses (every engine for a hypergradient learner; one for the others, which take no
hypergradient), this trains a small BatchNorm MLP with ``wrapper.step`` (and, for the paper's MAXL, the
three-line loop ``loss``/``backward``/``meta_step``) on one fixed batch and records, at given steps, the
process's resident memory and the number of tensors the garbage collector can reach. A leak of one graph,
tensor or list entry per step grows both with the step count; flat memory keeps both at the value they had
once the run was warm.

    python -m benchmarks.graph_lifetime --steps 20000 --marks 200,2000,20000 --out benchmarks/results/graph_lifetime/cpu_bn_mlp.md

tests/test_graph_lifetime.py runs the same measurement for 2,000 steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from auxlab import MetaAuxWrapper
from auxlab.data import TrainingData
from auxlab.engines import ENGINES
from auxlab.generators import GENERATORS
from auxlab.learners.hypergradient import HypergradientLearner
from auxlab.weighting import WEIGHTINGS

NUM_CLASSES, PSI, SAMPLES, FEATURES = 3, 2, 8, 6
#: The generator that learns no labels, for a weighting that learns (a meta-learned weighting needs fixed labels).
FIXED_LABELS = "random"
#: Strategies this small MLP cannot run, and why (none of them learns in the meta step).
NOT_ON_THIS_MODEL = {"sla": "rotates images (psi 4, image inputs); its labels are fixed"}
#: Loops a case can train with: the fused ``wrapper.step``, or ``loss``, ``backward``, ``optimizer.step``, ``meta_step``.
LOOPS = ("step", "loss+meta_step")


@dataclass(frozen=True)
class Case:
    """One run: a strategy (generator and weighting), an engine, and the loop."""

    generator: str
    weighting: str = "constant"
    engine: str = "jvp"
    loop: str = "step"

    @property
    def name(self) -> str:
        weighting = "" if self.weighting == "constant" else f"+{self.weighting}"
        loop = "" if self.loop == "step" else f" ({self.loop})"
        return f"{self.generator}{weighting} / {self.engine}{loop}"


@dataclass
class Trace:
    """What one case held at each mark: resident memory (MiB; None where /proc is missing) and live tensors."""

    case: Case
    marks: list[int] = field(default_factory=list)
    resident_mib: list[float | None] = field(default_factory=list)
    tensors: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _data() -> tuple[Tensor, Tensor, TrainingData]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = torch.arange(SAMPLES) % NUM_CLASSES
    fine = y * PSI + torch.randint(0, PSI, (SAMPLES,), generator=g)
    fine_to_coarse = [c for c in range(NUM_CLASSES) for _ in range(PSI)]
    return x, y, TrainingData(torch.utils.data.TensorDataset(x, y), fine_labels=fine, fine_to_coarse=fine_to_coarse)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def build(case: Case) -> MetaAuxWrapper:
    """The wrapper of ``case`` on the small BatchNorm MLP, seeded."""
    *_, data = _data()
    torch.manual_seed(0)
    return MetaAuxWrapper(
        _model(), num_classes=NUM_CLASSES, psi=PSI, generator=case.generator, weighting=case.weighting, engine=case.engine,
        generator_kwargs=GENERATORS[case.generator].kwargs_from_data(data), seed=0,
    )


def cases() -> list[Case]:
    """Every learning strategy under every engine it uses, and the three-line loop of the paper's MAXL."""
    found = []
    for name in sorted(GENERATORS):
        if name in NOT_ON_THIS_MODEL:
            continue
        wrapper = build(Case(name))
        if wrapper.meta_learner is None:
            continue
        engines = sorted(ENGINES) if isinstance(wrapper.meta_learner, HypergradientLearner) else ["jvp"]
        found += [Case(name, engine=engine) for engine in engines]
    found += [Case(FIXED_LABELS, weighting=name) for name, cls in sorted(WEIGHTINGS.items()) if cls.meta_learned]
    return [*found, Case("maxl", loop="loss+meta_step")]


def resident_mib() -> float | None:
    """This process's resident memory in MiB (Linux's /proc/self/statm), or None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    """The tensors (parameters included) the garbage collector can reach, after a full collection."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, Tensor))


def trace(case: Case, marks: Sequence[int]) -> Trace:
    """Train ``case`` for ``max(marks)`` steps on one fixed batch, recording memory at each mark."""
    wrapper = build(case)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9)
    x, y, _ = _data()
    index, x_meta, y_meta = torch.arange(SAMPLES), x.flip(0), y.flip(0)
    result = Trace(case)
    start = time.perf_counter()
    for step in range(1, max(marks) + 1):
        if case.loop == "step":
            wrapper.step(x, y, optimizer, index=index, x_meta=x_meta, y_meta=y_meta)
        else:
            loss = wrapper.loss(x, y, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wrapper.meta_step(x, y, x_meta, y_meta, index=index)
        if step in marks:
            result.marks.append(step)
            result.tensors.append(live_tensors())
            result.resident_mib.append(resident_mib())
    result.seconds = time.perf_counter() - start
    return result


def markdown(traces: Sequence[Trace], command: str) -> str:
    """The results as a Markdown table, with the command, machine and date."""
    marks = traces[0].marks
    lines = [
        "# Memory over a long run: resident memory and live tensors at each mark (small BatchNorm MLP, batch 8)",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        ("Resident memory is the whole process's (the first case also pays for warming the allocator); live tensors are "
         "those the garbage collector reaches after a full collection, parameters and optimizer state included."),
        "",
        "| case | " + " | ".join(f"MiB at {m}" for m in marks) + " | " + " | ".join(f"tensors at {m}" for m in marks) + " | s |",
        "|---|" + "---:|" * (2 * len(marks) + 1),
    ]
    for t in traces:
        memory = " | ".join("n/a" if r is None else f"{r:.1f}" for r in t.resident_mib)
        lines.append(f"| {t.case.name} | {memory} | {' | '.join(map(str, t.tensors))} | {t.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps per case (default: 2000)")
    parser.add_argument("--marks", default="200,2000", help="comma-separated steps at which to measure (default: 200,2000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the Markdown table here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    marks = sorted({int(m) for m in args.marks.split(",")} | {args.steps})
    traces: list[Trace] = []
    for case in cases():
        traces.append(trace(case, marks))
        print(f"{case.name}: tensors {traces[-1].tensors}, MiB {traces[-1].resident_mib}", flush=True)
    command = "python -m benchmarks.graph_lifetime " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(traces, command)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
