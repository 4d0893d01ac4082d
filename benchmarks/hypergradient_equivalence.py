"""Does this checkout of auxlab compute what another one does? Hypergradients and trained states, in float64.

Runs the same scenarios (every engine with ``"maxl"`` and ``"maxl-light"``, ``"rl"``, the weightings,
fixed labels, single task) under this checkout and under a reference checkout (for example a
``git worktree`` of an earlier commit), each in its own process, from the same seeds, and prints the
largest absolute difference of each scenario's tensors:

- ``meta_step``: the meta gradient of one meta step (``.grad`` of the generator's or the weighting's
  parameters; the generator's with a learning rate of 0);
- ``step x3``: every tensor of ``state_dict()`` after three ``wrapper.step`` calls (SGD with momentum
  on the model, the strategy's own meta optimizer), which covers the model step, the meta step and
  the BatchNorm statistics.

Only the public API is used, so any two versions with the same API can be compared. Usage::

    git worktree add /tmp/auxlab_reference <commit>
    python -m benchmarks.hypergradient_equivalence --reference /tmp/auxlab_reference --out benchmarks/results/hypergradient_equivalence/<what>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: (name, MetaAuxWrapper keyword arguments) of every scenario.
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    *[(f"maxl {engine}", {"engine": engine}) for engine in ("functional", "higher", "jvp", "finite_difference")],
    *[(f"maxl-light {engine}", {"engine": engine, "generator": "maxl-light"}) for engine in ("functional", "higher", "jvp", "finite_difference")],
    ("maxl jvp meta_every=2", {"meta_every": 2}),
    ("maxl jvp virtual_params", {"virtual_params": ["aux_head", "model.fc"]}),
    ("maxl jvp focal", {"focal_gamma": 2.0}),
    ("rl", {"generator": "rl"}),
    ("random", {"generator": "random", "generator_kwargs": {"num_samples": 9}}),
    ("random gcs", {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "gcs"}),
    ("random uncertainty", {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "uncertainty"}),
    ("random maoal", {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "maoal"}),
    ("single", {"generator": "single"}),
    # the strategies' default meta optimizers (every other scenario passes its own)
    ("maxl default optimizer", {"default_optimizer": True}),
    ("rl default optimizer", {"generator": "rl", "default_optimizer": True}),
    ("random maoal default optimizer", {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "maoal", "default_optimizer": True}),
]


class _Net(nn.Module):
    """Linear -> BatchNorm1d -> tanh -> Linear (float64): BatchNorm statistics, a feature layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bn(self.hidden(x))))


def _wrapper(kwargs: dict[str, Any], *, generator_lr: float) -> Any:
    from auxlab import MetaAuxWrapper

    torch.manual_seed(0)
    kwargs = dict(kwargs)
    default_optimizer = kwargs.pop("default_optimizer", False)
    learning = kwargs.get("generator", "maxl") in ("maxl", "maxl-light", "rl") and not default_optimizer
    options: dict[str, Any] = {"inner_lr": 0.1, "aux_weight": 0.7, "entropy_weight": 0.3, "seed": 0, **kwargs}
    if learning:
        options["generator_optimizer"] = lambda params: torch.optim.SGD(params, lr=generator_lr, momentum=0.9)
    return MetaAuxWrapper(_Net().double(), num_classes=3, psi=2, **options)


def _batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)


def run_scenarios() -> dict[str, dict[str, Tensor]]:
    """Every scenario's tensors under the auxlab that ``import auxlab`` finds."""
    torch.set_num_threads(1)
    results: dict[str, dict[str, Tensor]] = {}
    index = torch.arange(9)
    for name, kwargs in SCENARIOS:
        out: dict[str, Tensor] = {}
        wrapper = _wrapper(kwargs, generator_lr=0.0)
        x, y = _batch(1)
        x_meta, y_meta = _batch(2)
        if wrapper.meta_step(x, y, x_meta, y_meta, index=index) is not None:
            learned = [*(wrapper.generator.parameters() if wrapper.generator is not None else []), *wrapper.weighting.parameters()]
            for i, p in enumerate(learned):
                if p.grad is not None:
                    out[f"meta_step.grad.{i}"] = p.grad.detach().clone()
        wrapper = _wrapper(kwargs, generator_lr=0.05)
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            x, y = _batch(10 + step)
            wrapper.step(x, y, optimizer, index=index, x_meta=x_meta, y_meta=y_meta)
        for key, value in wrapper.state_dict().items():
            if isinstance(value, Tensor) and value.is_floating_point():
                out[f"step.{key}"] = value.detach().clone()
        results[name] = out
    return results


def _run_in(tree: Path, out: Path) -> None:
    """Run :func:`run_scenarios` of this file in a fresh process whose ``auxlab`` is ``tree``'s; save to ``out``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (
        "import runpy, torch, auxlab; "
        f"assert auxlab.__file__.startswith({str(tree.resolve())!r}), auxlab.__file__; "
        f"torch.save(runpy.run_path({str(Path(__file__).resolve())!r})['run_scenarios'](), {str(out)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tempfile.gettempdir())


def compare(this: dict[str, dict[str, Tensor]], reference: dict[str, dict[str, Tensor]]) -> list[tuple[str, int, float, float]]:
    """``(scenario, tensors compared, largest |difference|, largest |value|)`` of every scenario; a
    ValueError if a scenario's tensors are not the same set in both."""
    rows = []
    for name, _ in SCENARIOS:
        a, b = this[name], reference[name]
        if a.keys() != b.keys():
            raise ValueError(f"{name}: different tensors: {sorted(set(a) ^ set(b))[:5]}")
        difference = max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)
        scale = max((float(b[k].abs().max()) for k in b), default=0.0)
        rows.append((name, len(a), difference, scale))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="the root of the other checkout (holding auxlab/)")
    parser.add_argument("--out", type=Path, help="write the table as Markdown here too")
    args = parser.parse_args(argv)
    this_tree = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: Path(folder) / f"{name}.pt" for name in ("this", "reference")}
        _run_in(this_tree, paths["this"])
        _run_in(args.reference, paths["reference"])
        rows = compare(torch.load(paths["this"]), torch.load(paths["reference"]))
    lines = [
        "# Hypergradients and trained states: this checkout against a reference checkout (float64)",
        "",
        f"Command: `python -m benchmarks.hypergradient_equivalence --reference {args.reference}`  ",
        f"This checkout: {_commit(this_tree)}; reference: {_commit(args.reference)}  ",
        f"Machine: {platform.machine()}, {platform.system()}, torch {torch.__version__}; {datetime.date.today().isoformat()}",
        "",
        "| scenario | tensors | max abs difference | max abs value |",
        "|---|---|---|---|",
        *[f"| {name} | {count} | {difference:.3g} | {scale:.3g} |" for name, count, difference, scale in rows],
        "",
        f"Largest difference over all scenarios: {max(r[2] for r in rows):.3g}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _commit(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True).stdout.strip()
    return (result.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    main()
