"""What one training step costs with auxlab, as a ratio to plain single-task training.

Times, in one process, after warm-up, with the variants interleaved round-robin inside every repeat
(so that load from other processes hits all of them alike):

1. ``single-task step``: a plain model, cross entropy, ``SGD.step``: a user's loop without auxlab;
2. ``auxlab single-task step``: the same through ``MetaAuxWrapper(generator="single")``;
3. ``auxlab model step``: ``wrapper.loss`` + ``backward`` + ``opt.step`` with the MAXL generator;
4. ``meta step (<engine>)``: ``wrapper.meta_step`` alone, per hypergradient engine (default: every
   engine auxlab registers);
5. ``MAXL iteration (<engine>)``: a model step followed by a meta step, per engine;
6. ``wrapper.step (<engine>)``: ``wrapper.step(x, y, opt)``, both steps in one call, per engine;

(3) to (6) are repeated for every label generator of ``--generators`` (default ``maxl``, the
paper's copy of the classifier); a generator other than ``maxl`` is named in the variant, e.g.
``wrapper.step (jvp, maxl-light)``.

7. ``wrapper.step [<method>]``: for every method of ``--methods``, written as the experiments
   runner's strategies ``generator[+weighting]`` (e.g. ``random+gcs``, ``random+maoal``, ``sla``,
   ``rl``): ``wrapper.step(x, y, opt, index=..., x_meta=..., y_meta=...)`` with a development batch
   of the same size as the meta batch (used by ``maoal`` and ``rl``). ``random`` stands for every
   fixed-label strategy (``kmeans`` and ``human`` cost the same: a table lookup); ``sla`` uses
   ``psi = 4``, its four rotations.

All of them run in the same round-robin, so their ratios are comparable with each other.

and reports each one's median time, interquartile range and fastest time, its ratio to (1) and its
peak memory as a ratio to (1)'s. ``--profile`` instead runs ``torch.profiler`` over a few labelled
MAXL iterations per engine and reports where the time goes. docs/performance.md has the results.

Run from the repository root (``python benchmarks/step_cost.py`` works too)::

    python -m benchmarks.step_cost --model cnn --batch-size 64 --psi 5 --repeats 40 \\
        --out benchmarks/results/step_cost_cpu_cnn.md
    python -m benchmarks.step_cost --model cnn --batch-size 64 --psi 5 --profile --profile-iterations 10 \\
        --out benchmarks/results/profile_cpu_cnn.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from typing_extensions import Self

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auxlab import MetaAuxWrapper
from auxlab.engines import SHARED_DERIVATIVES
from benchmarks.models import MODELS, build_model

SINGLE = "single-task step"
AUXLAB_SINGLE = "auxlab single-task step"
MODEL_STEP = "auxlab model step"
#: The generator whose variants carry no generator name (the paper's; the wrapper's default).
DEFAULT_GENERATOR = "maxl"


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
        """The variants :func:`measure` reports, in table order."""
        names = [SINGLE, AUXLAB_SINGLE]
        for g in self.generators:
            names += (
                [model_step_name(g)]
                + [meta_step_name(e, g) for e in self.engines]
                + [iteration_name(e, g) for e in self.engines]
                + [step_name(e, g) for e in self.engines]
            )
        return names + [method_step_name(m) for m in self.methods]

    def wrapper_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every MAXL wrapper the benchmark builds."""
        kwargs: dict[str, Any] = {"psi": self.psi, "seed": self.seed, "meta_every": self.meta_every}
        if self.virtual_params is not None:
            kwargs["virtual_params"] = list(self.virtual_params)
        return kwargs


@dataclass
class Variant:
    """One thing to time: ``step`` runs it once; ``clear`` drops the ``.grad`` tensors it left behind."""

    name: str
    step: Callable[[], Any]
    clear: Callable[[], None]
    #: how many training steps one ``step`` call takes; times are reported per training step
    calls: int = 1


@dataclass
class Row:
    """One line of the table. Times in seconds, one per repeat; ``ratios`` are paired per repeat."""

    variant: str
    times: list[float]
    ratios: list[float]
    peak_bytes: int | None = None
    memory_ratio: float | None = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def iqr_ms(self) -> float:
        return 1e3 * _iqr(self.times)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times)

    @property
    def ratio(self) -> float:
        """Median over repeats of (this variant's time / the single-task step's time in the same repeat)."""
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> float:
        return _iqr(self.ratios)


@dataclass
class Result:
    config: Config
    rows: list[Row]
    memory_method: str
    threads: int
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    auxlab: str = "unknown"


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


# --------------------------------------------------------------------------------------- variants
def make_batch(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """A fixed random batch ``x: (B, 3, S, S)``, ``y: (B,)`` covering the classes in turn."""
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator)
    y = torch.arange(config.batch_size) % config.num_classes
    return x.to(device), y.to(device)


def _update(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward(); optimizer.step()``, through ``scaler`` if given (``.grad`` was cleared before the forward)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _model_step(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    _update(wrapper.loss(x, y), optimizer, scaler)


def _iteration(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """A MAXL iteration in the two-call form: the model step, then ``meta_step``."""
    _model_step(wrapper, optimizer, x, y, scaler)
    wrapper.meta_step(x, y)


def _clear(*optimizers: torch.optim.Optimizer | None) -> Callable[[], None]:
    def clear() -> None:
        for optimizer in optimizers:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)

    return clear


def _repeated(step: Callable[[], Any], times: int) -> Callable[[], None]:
    """``step`` called ``times`` times in a row (``step`` itself when once)."""
    if times == 1:
        return step

    def run() -> None:
        for _ in range(times):
            step()

    return run


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _scaler(config: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """A fresh GradScaler for one variant under float16 autocast; None otherwise."""
    return torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None


def _under_autocast(variants: list[Variant], config: Config, device: torch.device) -> list[Variant]:
    """``variants`` whose steps run under ``torch.autocast`` with ``config.autocast``'s dtype (as they are if None)."""
    if config.autocast is None:
        return variants
    dtype = AUTOCAST_DTYPES[config.autocast]

    def under(step: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=dtype):
                step()

        return run

    return [Variant(v.name, under(v.step), v.clear, v.calls) for v in variants]


def build_variants(config: Config, x: Tensor, y: Tensor) -> list[Variant]:
    """Every variant gets its own copy of one freshly initialised model, on ``x``'s device."""
    if config.autocast == "fp16" and any(e not in SHARED_DERIVATIVES for e in config.engines):
        raise ValueError(f"autocast fp16 runs wrapper.step with a GradScaler, which needs engines among {sorted(SHARED_DERIVATIVES)}; got {config.engines}")
    base = build_model(config.model, num_classes=config.num_classes, seed=config.seed).to(x.device).train()
    variants: list[Variant] = []

    plain = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=config.lr)
    plain_scaler = _scaler(config, x.device)

    def single_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        _update(F.cross_entropy(plain(x), y), plain_opt, plain_scaler)

    variants.append(Variant(SINGLE, single_step, _clear(plain_opt)))

    def wrap(engine: str, generator: str = DEFAULT_GENERATOR) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
        kwargs = {"seed": config.seed} if generator == "single" else config.wrapper_kwargs()
        wrapper = MetaAuxWrapper(copy.deepcopy(base), num_classes=config.num_classes, generator=generator, engine=engine, **kwargs).train()
        return wrapper, torch.optim.SGD(wrapper.parameters(), lr=config.lr)

    w, opt = wrap(config.engines[0], "single")
    variants.append(Variant(AUXLAB_SINGLE, functools.partial(_model_step, w, opt, x, y, _scaler(config, x.device)), _clear(opt)))
    for g in config.generators:
        w, opt = wrap(config.engines[0], g)
        model_step = functools.partial(_model_step, w, opt, x, y, _scaler(config, x.device))
        variants.append(Variant(model_step_name(g), model_step, _clear(opt, w.generator_optimizer)))
        # with meta_every = k, one timed call runs k batches (one meta step) and counts as k
        k = config.meta_every
        for engine in config.engines:
            w, opt = wrap(engine, g)
            variants.append(Variant(meta_step_name(engine, g), _repeated(functools.partial(w.meta_step, x, y), k), _clear(opt, w.generator_optimizer), k))
        for engine in config.engines:
            w, opt = wrap(engine, g)

            iteration = functools.partial(_iteration, w, opt, x, y, _scaler(config, x.device))
            variants.append(Variant(iteration_name(engine, g), _repeated(iteration, k), _clear(opt, w.generator_optimizer), k))
        for engine in config.engines:
            w, opt = wrap(engine, g)
            step = functools.partial(w.step, x, y, opt, scaler=_scaler(config, x.device))
            variants.append(Variant(step_name(engine, g), _repeated(step, k), _clear(opt, w.generator_optimizer), k))
    index = torch.arange(x.shape[0], device=x.device)
    x_dev, y_dev = x.flip(0), y.flip(0)  # a development batch for maoal and rl
    for method in config.methods:
        generator, _, weighting = method.partition("+")
        kwargs = {**config.wrapper_kwargs(), "psi": 4 if generator == "sla" else config.psi, "weighting": weighting or "constant"}
        if generator == "random":
            kwargs["generator_kwargs"] = {"num_samples": x.shape[0]}
        w = MetaAuxWrapper(copy.deepcopy(base), num_classes=config.num_classes, generator=generator, engine=config.engines[0], **kwargs).train()
        opt = torch.optim.SGD(w.parameters(), lr=config.lr)
        step = functools.partial(w.step, x, y, opt, index=index, x_meta=x_dev, y_meta=y_dev, scaler=_scaler(config, x.device))
        variants.append(Variant(method_step_name(method), step, _clear(opt, w.generator_optimizer, w.weighting_optimizer)))
    return _under_autocast(variants, config, x.device)


# --------------------------------------------------------------------------------------- memory
CPU_MEMORY_METHOD = (
    "CPU: torch.profiler(profile_memory=True) allocation/free events of one step, replayed in time order; "
    "peak = highest running total above the state at the step's start (allocations through PyTorch's CPU "
    "allocator; scratch memory that oneDNN/BLAS allocate on their own is not seen)"
)
CUDA_MEMORY_METHOD = "CUDA: torch.cuda.max_memory_allocated() - memory_allocated() at the step's start (peak stats reset per step)"


def peak_step_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated by ``step`` at its peak, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    host = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() in host]
    records.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for record in records:
        total += record.nbytes()
        peak = max(peak, total)
    return peak


# --------------------------------------------------------------------------------------- timing
def measure(config: Config, *, progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> Result:
    """Time every variant of ``config`` and measure its peak memory; rows in :meth:`Config.variant_names` order.

    Each repeat runs every variant once, in round-robin order starting one variant later each
    repeat, timed with ``time.perf_counter`` (``torch.cuda.synchronize`` before and after on CUDA).
    The garbage collector runs between variants, outside the timed regions (and is off inside
    them). Memory is measured after the timing, one step per variant, with ``.grad`` cleared first.
    """
    if config.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {config.repeats}")
    if not config.engines:
        raise ValueError("give at least one engine")
    if not config.generators:
        raise ValueError("give at least one generator")
    version = auxlab_version()
    device = torch.device(config.device)
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x, y = make_batch(config, device)
    variants = build_variants(config, x, y)
    load_before = _loadavg()
    for _ in range(config.warmup):
        for variant in variants:
            variant.step()
    sync()

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: dict[str, int] = {}
    gc_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()  # everything alive now is left out of later collections, which stay cheap
    gc.disable()
    try:
        for r in progress(range(config.repeats)) if progress else range(config.repeats):
            for k in range(len(variants)):
                variant = variants[(r + k) % len(variants)]
                sync()
                start = perf_counter()
                variant.step()
                sync()
                times[variant.name].append((perf_counter() - start) / variant.calls)
                gc.collect()
        load_after = _loadavg()
        if config.memory:
            for variant in variants:
                variant.clear()
                gc.collect()
                peaks[variant.name] = peak_step_memory(variant.step, device)
    finally:
        gc.unfreeze()
        if gc_enabled:
            gc.enable()

    rows = [Row(v.name, times[v.name], [t / s for t, s in zip(times[v.name], times[SINGLE])], peaks.get(v.name)) for v in variants]
    reference = peaks.get(SINGLE)
    for row in rows:
        row.memory_ratio = row.peak_bytes / reference if reference and row.peak_bytes is not None else None
    method = (CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD) if config.memory else "not measured"
    return Result(config, rows, method, torch.get_num_threads(), load_before, load_after, version)


# --------------------------------------------------------------------------------------- profiling
class _Labeller:
    """Puts ``torch.profiler.record_function`` ranges around the parts of a MAXL iteration, from outside
    the library, while ``phase`` names the step being run ("model step", "meta step", "step"):

    - global module forward hooks mark the generator's forward and the classifier's forward passes
      (in the meta step, numbered: at theta, at theta', then any further ones, which the jvp and
      finite-difference engines make to take a directional derivative);
    - a wrapper around ``torch.autograd.grad`` marks each gradient computation, named after what the
      calling function does with it (the hypergradient, the virtual step's gradient with
      ``create_graph=True``, the gradients at theta and theta' of the linearised engines);
    - optimizer step hooks mark the model's and the generator's optimizer steps.

    Active only inside ``with labeller:``. On CUDA every range synchronizes the device when it opens
    and closes, so that it covers the kernels it launched.
    """

    FORWARDS = ("classifier forward at theta", "classifier forward at theta'")

    def __init__(self, wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer) -> None:
        self.wrapper = wrapper
        self.optimizer = optimizer
        self.cuda = next(wrapper.model.parameters()).device.type == "cuda"
        self.phase: str | None = None
        self.forwards = 0
        self.linearised_grads = 0
        self.grad_labels: set[str] = set()
        self.opened: set[str] = set()
        self._stack: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._grad = torch.autograd.grad

    def start(self, phase: str | None) -> None:
        self.phase, self.forwards, self.linearised_grads = phase, 0, 0

    def open(self, label: str) -> Any:
        if self.cuda:
            torch.cuda.synchronize()
        self.opened.add(label)
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        return rf

    def close(self, rf: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def range(self, label: str) -> Iterator[None]:
        rf = self.open(label)
        try:
            yield
        finally:
            self.close(rf)

    def _label(self, module: nn.Module) -> str | None:
        generator = self.wrapper.generator
        if self.phase is None or generator is None:
            return None
        if module is generator:
            return f"{self.phase}: generator forward (targets)"
        if any(m is generator for m, _ in self._stack):
            return None  # inside the generator's forward (e.g. maxl-light runs the classifier for its features)
        # The classifier itself, or higher's patched copy of it (same class); not the generator's copy.
        if isinstance(module, type(self.wrapper.model)) and module is not getattr(generator, "network", None):
            if self.phase == "model step":
                return "model step: classifier forward"
            self.forwards += 1
            if self.forwards <= len(self.FORWARDS):
                return f"{self.phase}: {self.FORWARDS[self.forwards - 1]}"
            return f"{self.phase}: classifier forwards for the directional derivative"
        return None

    def _pre(self, module: nn.Module, args: Any) -> None:
        label = self._label(module)
        if label is not None:
            self._stack.append((module, self.open(label)))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1][0] is module:
            self.close(self._stack.pop()[1])

    def _labelled_grad(self, *args: Any, **kwargs: Any) -> Any:
        if self.phase is None or self.phase == "model step":
            return self._grad(*args, **kwargs)
        frame = sys._getframe(1)
        if frame.f_code.co_name == "scaled_grad" and frame.f_back is not None:  # auxlab's one gradient helper: name its caller
            frame = frame.f_back
        caller = frame.f_code.co_name
        create_graph = kwargs.get("create_graph", args[4] if len(args) > 4 else False)
        if caller == "_meta_gradient":  # the generator's (or a weighting's) gradient
            what = "hypergradient backward"
        elif create_graph:
            what = "virtual-step grad (create_graph=True)"
        elif caller == "linearised_step":
            self.linearised_grads += 1
            what = "gradient at theta" if self.linearised_grads == 1 else "gradient at theta' (u)"
        else:
            what = f"autograd.grad in {caller}"
        label = f"{self.phase}: {what}"
        self.grad_labels.add(label)
        with self.range(label):
            return self._grad(*args, **kwargs)

    def _optimizer_hooks(self, optimizer: torch.optim.Optimizer | None, what: str) -> list[Any]:
        if optimizer is None:
            return []
        state: dict[str, Any] = {}

        def pre(*_: Any) -> None:
            if self.phase is not None:
                state["rf"] = self.open(f"{self.phase}: {what}")

        def post(*_: Any) -> None:
            if "rf" in state:
                self.close(state.pop("rf"))

        return [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def __enter__(self) -> Self:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        self._handles += self._optimizer_hooks(self.optimizer, "optimizer step")
        self._handles += self._optimizer_hooks(self.wrapper.generator_optimizer, "generator optimizer step")
        torch.autograd.grad = self._labelled_grad
        return self

    def __exit__(self, *exc: object) -> None:
        torch.autograd.grad = self._grad
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def iteration(self, x: Tensor, y: Tensor) -> None:
        """One MAXL iteration as a user writes it, labelled: the model step, then the meta step."""
        with self.range(ITERATION):
            self.start("model step")
            with self.range("model step"):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.wrapper.loss(x, y)
                with self.range("model step: backward"):
                    loss.backward()
                self.optimizer.step()
            self.start("meta step")
            with self.range("meta step"):
                self.wrapper.meta_step(x, y)
            self.start(None)

    def step(self, x: Tensor, y: Tensor) -> None:
        """One ``wrapper.step`` (model step and meta step sharing their work), labelled."""
        self.start("step")
        with self.range("step"):
            self.wrapper.step(x, y, self.optimizer)
        self.start(None)


ITERATION = "MAXL iteration"
NODE_PREFIX = "autograd::engine::evaluate_function: "


def _parent(label: str) -> str | None:
    """The range that contains ``label``: "meta step: x" is inside "meta step", which is inside the iteration."""
    if label in ("model step", "meta step"):
        return ITERATION
    return label.split(": ", 1)[0] if ": " in label else None


def profile_engine(config: Config, engine: str, *, iterations: int = 3, row_limit: int = 25) -> dict[str, Any]:
    """Profile ``iterations`` labelled MAXL iterations, single-task steps and (for engines that share
    work between the two steps) ``wrapper.step`` calls with ``engine``.

    Returns a dict: ``durations_ms`` (each label's wall-clock time on the calling thread in each round,
    under the profiler), ``per_iteration_ms`` (their medians), ``counts`` (ranges per label),
    ``order`` (labels in the order they first ran), ``grad_labels`` (the ranges around
    ``autograd.grad``), ``inside`` and ``nodes`` (self CPU time of each op, total CPU time of each kind
    of autograd node, inside each of those ranges, median per iteration) and ``table`` (top ops).
    """
    from torch.profiler import ProfilerActivity, profile


    device = torch.device(config.device)
    x, y = make_batch(config, device)
    base = build_model(config.model, num_classes=config.num_classes, seed=config.seed).to(device).train()
    plain = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=config.lr)
    wrapper = MetaAuxWrapper(
        copy.deepcopy(base), num_classes=config.num_classes, engine=engine, generator=config.generators[0], **config.wrapper_kwargs()
    ).train()
    labeller = _Labeller(wrapper, torch.optim.SGD(wrapper.parameters(), lr=config.lr))
    shared = engine in SHARED_DERIVATIVES

    def single_step() -> None:
        with labeller.range(SINGLE):
            plain_opt.zero_grad(set_to_none=True)
            F.cross_entropy(plain(x), y).backward()
            plain_opt.step()

    def one_round() -> None:
        single_step()
        labeller.iteration(x, y)
        if shared:
            labeller.step(x, y)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labeller:
        for _ in range(max(config.warmup, 1)):
            one_round()
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                one_round()
    events = list(prof.events())
    labels = {e.name for e in events if e.name in labeller.opened}
    # Each labelled range belongs to round i: the i-th single-task step, MAXL iteration or step.
    tops = (SINGLE, ITERATION, "step")
    round_of: dict[int, int] = {}
    for top in tops:
        ranges = sorted((e for e in events if e.name == top), key=lambda e: e.time_range.start)
        round_of.update({id(e): i for i, e in enumerate(ranges)})
    durations: dict[str, list[float]] = {}
    first_start: dict[str, float] = {}
    for event in events:
        if event.name not in labels:
            continue
        top_event = event
        while top_event.name not in tops and top_event.cpu_parent is not None:
            top_event = top_event.cpu_parent
        # a label that runs several times in one round (the finite-difference forwards) adds up
        durations.setdefault(event.name, [0.0] * iterations)[round_of[id(top_event)]] += event.cpu_time_total / 1e3
        first_start[event.name] = min(first_start.get(event.name, math.inf), event.time_range.start)
    order = sorted(labels, key=first_start.__getitem__)
    # Time of each op and each kind of autograd node inside the autograd.grad ranges, per iteration.
    grad_labels = sorted(labeller.grad_labels & labels, key=order.index)
    iteration_of: dict[int, int] = {}
    for label in grad_labels:
        ranges = sorted((e for e in events if e.name == label), key=lambda e: e.time_range.start)
        iteration_of.update({id(e): i for i, e in enumerate(ranges)})
    inside: dict[str, dict[str, list[float]]] = {label: {} for label in grad_labels}
    nodes: dict[str, dict[str, list[float]]] = {label: {} for label in grad_labels}
    for event in events:
        ancestor = event.cpu_parent
        while ancestor is not None and ancestor.name not in inside:
            ancestor = ancestor.cpu_parent
        if ancestor is None or event.name in labels:
            continue
        i = iteration_of[id(ancestor)]
        inside[ancestor.name].setdefault(event.name, [0.0] * iterations)[i] += event.self_cpu_time_total / 1e3
        if event.name.startswith(NODE_PREFIX):
            name = event.name[len(NODE_PREFIX):]
            nodes[ancestor.name].setdefault(name, [0.0] * iterations)[i] += event.cpu_time_total / 1e3
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=60)
    return {
        "durations_ms": durations,
        "per_iteration_ms": {label: statistics.median(ms) for label, ms in durations.items()},
        "counts": {label: sum(1 for e in events if e.name == label) for label in durations},
        "order": order,
        "grad_labels": grad_labels,
        "inside": {label: {op: statistics.median(ms) for op, ms in ops.items()} for label, ops in inside.items()},
        "nodes": {label: {node: statistics.median(ms) for node, ms in ns.items()} for label, ns in nodes.items()},
        "table": table,
    }


def inside_markdown(label: str, ops: dict[str, float], total_ms: float, top: int = 12, *, what: str = "op", time: str = "self CPU") -> str:
    """The ops (or autograd nodes) with the most time inside the range ``label``: median per iteration, and its
    share of the range's median ``total_ms`` (medians do not add up exactly)."""
    lines = [f"| {what} inside '{label}' | {time} ms / iteration | share of the range |", "|---|---:|---:|"]
    for name, ms in sorted(ops.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| `{name}` | {ms:.1f} | {ms / total_ms:.0%} |")
    return "\n".join(lines)


def breakdown_markdown(durations_ms: dict[str, list[float]], order: Sequence[str] | None = None) -> str:
    """The labelled ranges as a table: median ms per iteration, as a share of the MAXL iteration's median
    and as a multiple of the single-task step's median; parts in the order they ran.

    After a range's parts comes its 'rest': its time that none of its parts covers (median over iterations).
    """
    order = list(order) if order is not None else list(durations_ms)
    median = {label: statistics.median(ms) for label, ms in durations_ms.items()}
    iteration = median.get(ITERATION, float("nan"))
    single = median.get(SINGLE, float("nan"))
    lines = ["| part | ms / iteration | share of MAXL iteration | x single-task step |", "|---|---:|---:|---:|"]

    def add(label: str, ms: float, level: int) -> None:
        lines.append(f"| {'&nbsp;' * 4 * level}{label} | {ms:.1f} | {ms / iteration:.0%} | {ms / single:.2f} |")

    def emit(label: str, level: int) -> None:
        add(label, median[label], level)
        parts = [child for child in order if _parent(child) == label and child in median]
        for part in parts:
            emit(part, level + 1)
        if parts:
            rest = [whole - sum(p) for whole, *p in zip(durations_ms[label], *(durations_ms[q] for q in parts))]
            add(f"{label}: rest (unlabelled)", statistics.median(rest), level + 1)

    for label in order:
        if _parent(label) is None and label in median:
            emit(label, 0)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- reporting
def machine_description(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch": torch.__version__,
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
        info["CUDA"] = str(torch.version.cuda)
    return info


def auxlab_version() -> str:
    """auxlab's version, and the git commit of its checkout (with '+ local changes' if auxlab/ differs from it)."""
    import subprocess

    import auxlab

    root = Path(auxlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "auxlab"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return auxlab.__version__
    return f"{auxlab.__version__}, git {commit}{' + local changes in auxlab/' if dirty else ''}"


GENERATOR_DESCRIPTIONS = {
    "maxl": "maxl (the paper's: a re-initialised copy of the model with an MLP head)",
    "maxl-light": "maxl-light (an MLP Linear(d, d) -> ReLU -> Linear(d, K) on the model's own head input, detached)",
}


def _header(title: str, command: str, device: torch.device, config: Config, auxlab_version: str) -> list[str]:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {title}", "", f"- command: `{command}`", f"- date: {date} (written at the end of the run)"]
    lines += [f"- {key}: {value}" for key, value in machine_description(device).items()]
    lines += [f"- auxlab: {auxlab_version} (when the run started)"]
    lines += [
        (
            f"- model: {config.model}, batch {config.batch_size}, {config.image_size}x{config.image_size}x3 input, "
            f"num_classes {config.num_classes}, psi {config.psi}, device {config.device}"
        ),
        (
            f"- optimizers: SGD(lr={config.lr}) on the model; auxlab defaults otherwise (cross entropy on both heads, "
            "generator SGD(lr=1e-3, weight_decay=5e-4), inner_lr 0.01, "
            + ("meta step on every batch)" if config.meta_every == 1 else
               f"meta_every={config.meta_every}: a meta step every {config.meta_every} batches; meta step, MAXL iteration and "
               f"wrapper.step are timed over {config.meta_every} consecutive batches and reported per batch)")
        ),
        "- generators: " + "; ".join(GENERATOR_DESCRIPTIONS.get(g, g) for g in config.generators),
        "- virtual step over: "
        + ("every trainable parameter (as in the paper)" if config.virtual_params is None else ", ".join(config.virtual_params)),
        f"- engines: {', '.join(config.engines)}",
    ]
    if config.autocast is not None:
        lines.append(
            f"- mixed precision: every variant under torch.autocast({device.type!r}, dtype={AUTOCAST_DTYPES[config.autocast]})"
            + ("; the single-task step, the model steps and wrapper.step with a torch.amp.GradScaler each (meta_step takes none)"
               if config.autocast == "fp16" else "")
        )
    if config.methods:
        lines.append(f"- methods (`wrapper.step [...]` rows; engine {config.engines[0]} where one is used): {', '.join(config.methods)}")
    return lines


def results_markdown(result: Result, command: str) -> str:
    config = result.config
    device = torch.device(config.device)
    lines = _header(f"Step cost: {config.model} on {config.device}", command, device, config, result.auxlab)

    def load(value: tuple[float, float, float] | None) -> str:
        return "n/a" if value is None else ", ".join(f"{v:.2f}" for v in value)

    lines += [
        f"- repeats {config.repeats} (after {config.warmup} warm-up rounds), variants interleaved round-robin",
        f"- load average (1, 5, 15 min) before timing: {load(result.load_before)}; after: {load(result.load_after)}",
        f"- peak memory: {result.memory_method}",
        "",
        table_markdown(result),
        "",
        "Times are per step: median over repeats, with the interquartile range (IQR), and the fastest repeat (min).",
        "The ratio is the median over repeats of (variant time / single-task step time in the same repeat), with its",
        "IQR; the ratio of mins divides the fastest times, which is the least affected by load from other processes",
        "(it only ever adds time). Peak memory is what the",
        "step allocates above what was allocated when it started (parameters and optimizer state already resident,",
        "`.grad` cleared first), as a ratio to the single-task step's.",
        "",
        "<details><summary>Every timing (ms), in repeat order</summary>",
        "",
        "| variant | times (ms) |",
        "|---|---|",
    ]
    lines += [f"| {row.variant} | {' '.join(f'{1e3 * t:.1f}' for t in row.times)} |" for row in result.rows]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def table_markdown(result: Result) -> str:
    lines = [
        "| variant | median ms | IQR ms | min ms | ratio to single-task | ratio IQR | ratio of mins | peak memory MB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single_min = result.rows[0].min_ms
    for row in result.rows:
        peak = "n/a" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:.1f}"
        mem = "n/a" if row.memory_ratio is None else f"{row.memory_ratio:.2f}"
        lines.append(
            f"| {row.variant} | {row.median_ms:.1f} | {row.iqr_ms:.1f} | {row.min_ms:.1f} | {row.ratio:.2f} | {row.ratio_iqr:.2f} "
            f"| {row.min_ms / single_min:.2f} | {peak} | {mem} |"
        )
    return "\n".join(lines)


def profile_markdown(
    config: Config, profiles: dict[str, dict[str, Any]], command: str, iterations: int, auxlab_version: str
) -> str:
    device = torch.device(config.device)
    lines = _header(f"Profile: {config.model} on {config.device}", command, device, config, auxlab_version)
    lines += [
        f"- torch.profiler over {iterations} rounds per engine, after warm-up: a single-task step, a MAXL iteration",
        "  (`loss` + `backward` + `opt.step`, then `meta_step`) and, for the engines whose work the two steps can",
        "  share, a `wrapper.step`; each part's time is its median over the rounds",
        "",
        "Labels come from the benchmark script only (the library is not edited): global module forward hooks mark",
        "the generator's and the classifier's forward passes, a wrapper around `torch.autograd.grad` marks each",
        "gradient computation (named after what the calling library function does with it), and optimizer step",
        "hooks mark the optimizers' steps. Times are wall-clock ranges on the calling thread under the profiler,",
        "which adds overhead per op, so read the shares and multiples, not the absolute milliseconds. 'rest' is",
        "what no label covers (in a meta step: the virtual-step arithmetic theta - lr * g, copies of BatchNorm",
        "buffers, the masked softmax and losses, the entropy term, the wrapper's checks).",
    ]
    for engine, data in profiles.items():
        lines += ["", f"## Engine: {engine}", "", breakdown_markdown(data["durations_ms"], data["order"]), ""]
        for label in data["grad_labels"]:
            total = data["per_iteration_ms"][label]
            lines += [inside_markdown(label, data["nodes"][label], total, 8, what="autograd node", time="total CPU"), ""]
            lines += [inside_markdown(label, data["inside"][label], total, 8), ""]
        unit = "CUDA" if device.type == "cuda" else "CPU"
        lines += [f"Top ops by self {unit} time (all {iterations} rounds together):", ""]
        lines += ["```", data["table"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = Config(
        model=args.model, batch_size=args.batch_size, psi=args.psi, num_classes=args.num_classes,
        image_size=args.image_size, repeats=args.repeats, warmup=args.warmup, device=args.device,
        engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()), lr=args.lr,
        memory=not args.no_memory, seed=args.seed,
        generators=tuple(g.strip() for g in args.generators.split(",") if g.strip()),
        virtual_params=tuple(p.strip() for p in args.virtual_params.split(",") if p.strip()) if args.virtual_params else None,
        meta_every=args.meta_every,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        autocast=args.autocast,
    )
    command = "python -m benchmarks.step_cost " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.profile:
        version = auxlab_version()
        profiles = {e: profile_engine(config, e, iterations=args.profile_iterations) for e in config.engines}
        report = profile_markdown(config, profiles, command, args.profile_iterations, version)
    else:
        from tqdm import tqdm

        result = measure(config, progress=lambda it: tqdm(it, desc=f"{config.model} repeats", unit="repeat"))
        report = results_markdown(result, command)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
