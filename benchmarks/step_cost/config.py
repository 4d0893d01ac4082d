"""What to measure: a run's configuration, the names of the variants it times, and the command-line options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.models import MODELS

DESCRIPTION = "What one training step costs with auxlab, as a ratio to plain single-task training."

SINGLE = "single-task step"
AUXLAB_SINGLE = "auxlab single-task step"
MODEL_STEP = "auxlab model step"
#: The generator whose variants carry no generator name (the paper's; the wrapper's default).
DEFAULT_GENERATOR = "maxl"
#: ``--autocast`` choices: the dtype every variant runs under.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _named(base: str, engine: str | None, generator: str) -> str:
    parts = ([engine] if engine is not None else []) + ([generator] if generator != DEFAULT_GENERATOR else [])
    return f"{base} ({', '.join(parts)})" if parts else base


def model_step_name(generator: str = DEFAULT_GENERATOR) -> str:
    return _named(MODEL_STEP, None, generator)


def meta_step_name(engine: str, generator: str = DEFAULT_GENERATOR) -> str:
    return _named("meta step", engine, generator)


def iteration_name(engine: str, generator: str = DEFAULT_GENERATOR) -> str:
    return _named("MAXL iteration", engine, generator)


def step_name(engine: str, generator: str = DEFAULT_GENERATOR) -> str:
    return _named("wrapper.step", engine, generator)


def method_step_name(method: str) -> str:
    return f"wrapper.step [{method}]"


def default_engines() -> tuple[str, ...]:
    """Every hypergradient engine auxlab registers, in its order."""
    from auxlab.engines import ENGINES

    return tuple(ENGINES)


@dataclass(frozen=True)
class Config:
    """What to measure. ``lr`` is the SGD learning rate of every model optimizer (the paper's 0.01)."""

    model: str = "cnn"
    batch_size: int = 64
    psi: int = 5
    num_classes: int = 10
    image_size: int = 32
    repeats: int = 30
    warmup: int = 3
    device: str = "cpu"
    engines: tuple[str, ...] = field(default_factory=default_engines)
    lr: float = 0.01
    memory: bool = True
    seed: int = 0
    virtual_params: tuple[str, ...] | None = None
    generators: tuple[str, ...] = (DEFAULT_GENERATOR,)
    meta_every: int = 1
    methods: tuple[str, ...] = ()
    #: None, "bf16" or "fp16": every variant runs under ``torch.autocast`` with that dtype; with
    #: "fp16", the single-task step, the model steps and ``wrapper.step`` use a ``GradScaler``
    autocast: str | None = None

    def variant_names(self) -> list[str]:
        """The variants :func:`~benchmarks.step_cost.timing.measure` reports, in table order."""
        names = [SINGLE, AUXLAB_SINGLE]
        for g in self.generators:
            names.append(model_step_name(g))
            for name_of in (meta_step_name, iteration_name, step_name):
                names += [name_of(e, g) for e in self.engines]
        return names + [method_step_name(m) for m in self.methods]

    def wrapper_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every MAXL wrapper the benchmark builds."""
        kwargs: dict[str, Any] = {"psi": self.psi, "seed": self.seed, "meta_every": self.meta_every}
        if self.virtual_params is not None:
            kwargs["virtual_params"] = list(self.virtual_params)
        return kwargs


# --------------------------------------------------------------------------------------- options
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--psi", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32, help="input height and width (vgg16 needs 32)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds of every variant first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--engines", default=",".join(default_engines()), help="comma-separated hypergradient engines")
    parser.add_argument(
        "--generators", default=DEFAULT_GENERATOR,
        help="comma-separated label generators (registered names), e.g. maxl,maxl-light; each gets its own model step, meta step, "
        "MAXL iteration and wrapper.step variants (--profile: the first one)",
    )
    parser.add_argument(
        "--virtual-params", default=None,
        help="comma-separated parameter names or prefixes for MetaAuxWrapper(virtual_params=...), e.g. aux_head,model.fc "
        "(default: every parameter, as in the paper)",
    )
    parser.add_argument(
        "--meta-every", type=int, default=1,
        help="MetaAuxWrapper(meta_every=k): the meta step on every k-th batch; those variants are timed over k batches, per batch",
    )
    parser.add_argument(
        "--methods", default="",
        help="comma-separated strategies as the experiments runner writes them, generator[+weighting], e.g. "
        "random,random+gcs,random+uncertainty,random+maoal,sla,rl: one wrapper.step variant each",
    )
    parser.add_argument(
        "--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
        help="run every variant under torch.autocast with bfloat16 or float16 (float16: with a GradScaler where a step takes one)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="profile MAXL iterations per engine instead of timing")
    parser.add_argument("--profile-iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    return parser.parse_args(argv)


def _names(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`Config` that :func:`parse_args`'s options describe."""
    return Config(
        model=args.model, batch_size=args.batch_size, psi=args.psi, num_classes=args.num_classes,
        image_size=args.image_size, repeats=args.repeats, warmup=args.warmup, device=args.device,
        engines=_names(args.engines), lr=args.lr, memory=not args.no_memory, seed=args.seed,
        generators=_names(args.generators),
        virtual_params=_names(args.virtual_params) if args.virtual_params else None,
        meta_every=args.meta_every, methods=_names(args.methods), autocast=args.autocast,
    )
