"""Profiling (``--profile``): where the time of a MAXL iteration goes, read from ``torch.profiler``.

The library marks its own parts with ``torch.profiler.record_function`` ranges whose names start
with ``auxlab.`` (:data:`LIBRARY_RANGES`). This module adds, from outside and with public torch API
only (nothing of torch or of auxlab is replaced):

- its own ranges around each round's parts: the single-task step; the MAXL iteration with its
  model step (``loss``, ``backward``, ``opt.step``) and its meta step; ``wrapper.step``;
- global module forward hooks that mark the classifier's forward passes (those run inside the
  generator's own forward are the generator's, and left unmarked);
- optimizer step hooks that mark the model's and the generator's optimizer steps.

:func:`read_profile` then finds every labelled range among the profiler's events, nests it in the
nearest labelled range around it, and names it after the phase it ran in: ``"meta step:
auxlab.gradient.meta"`` is the library's meta gradient inside a meta step, wherever the library
nests it. The classifier's forward passes in a meta step or a step are named by where they ran:
inside ``auxlab.targets`` (the features a generator such as ``maxl-light`` reads), inside
``auxlab.directional_derivative``, or else in order: at theta, at theta', and any further ones
(without the library's ranges, all of them are named in order).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from auxlab import MetaAuxWrapper
from auxlab.engines import ENGINES
from benchmarks.step_cost.config import SINGLE, Config
from benchmarks.step_cost.variants import base_model, make_batch, make_wrapper, single_task_step

#: The ranges auxlab opens with ``torch.profiler.record_function``, and what each one covers. Any
#: range whose name starts with :data:`LIBRARY_PREFIX` is read, listed here or not.
LIBRARY_RANGES = {
    "auxlab.step": "`MetaAuxWrapper.step`",
    "auxlab.loss": "`MetaAuxWrapper.loss`",
    "auxlab.meta_step": "`MetaAuxWrapper.meta_step`",
    "auxlab.targets": "the generator's forward pass that makes the auxiliary targets",
    "auxlab.gradient.model": "the gradient at theta of L_pri + aux_weight * L_aux (the model step's, the virtual step's)",
    "auxlab.gradient.separate": "the two losses' gradients apart (gradient-level weightings)",
    "auxlab.gradient.meta_loss": "u, the gradient of the primary loss at theta'",
    "auxlab.gradient.virtual_step": "the second-order engines' gradient with create_graph=True",
    "auxlab.gradient.meta": "the gradient of the meta objective for the learner's parameters (the hypergradient)",
    "auxlab.directional_derivative": "the jvp or finite-difference product",
}
LIBRARY_PREFIX = "auxlab."

# The benchmark's own ranges: the rounds, the phases of a round, and what the hooks mark.
ITERATION = "MAXL iteration"
MODEL_PHASE = "model step"
META_PHASE = "meta step"
STEP_PHASE = "step"
#: one of each per profiled round (``step`` for the engines whose work the two steps share)
ROUNDS = (SINGLE, ITERATION, STEP_PHASE)
PHASES = (MODEL_PHASE, META_PHASE, STEP_PHASE)
TARGETS = LIBRARY_PREFIX + "targets"
DIRECTIONAL_DERIVATIVE = LIBRARY_PREFIX + "directional_derivative"
CLASSIFIER_FORWARD = "classifier forward"
FORWARDS = ("classifier forward at theta", "classifier forward at theta'")
DERIVATIVE_FORWARDS = "classifier forwards for the directional derivative"
TARGETS_FORWARD = "classifier forward for the targets"
BACKWARD = "backward"
OPTIMIZER_STEP = "optimizer step"
GENERATOR_OPTIMIZER_STEP = "generator optimizer step"
OWN_LABELS = frozenset({*ROUNDS, *PHASES, CLASSIFIER_FORWARD, BACKWARD, OPTIMIZER_STEP, GENERATOR_OPTIMIZER_STEP})
NODE_PREFIX = "autograd::engine::evaluate_function: "


def is_label(name: str) -> bool:
    """Whether a profiler event is a labelled range: the benchmark's own or the library's."""
    return name in OWN_LABELS or name.startswith(LIBRARY_PREFIX)


def is_broken_down(name: str) -> bool:
    """Whether the profile lists the ops and autograd nodes inside a range: the library's gradients and products."""
    return name.startswith(LIBRARY_PREFIX + "gradient.") or name == DIRECTIONAL_DERIVATIVE


# --------------------------------------------------------------------------------------- labelling
class Labeller:
    """Opens the benchmark's own ranges around a MAXL iteration's parts (hooks; see the module's doc).

    Hooks are active only inside ``with labeller:``. On CUDA each of these ranges synchronizes the
    device when it opens and closes, so that it covers the kernels it launched.
    """

    def __init__(self, wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer) -> None:
        self.wrapper = wrapper
        self.optimizer = optimizer
        self.cuda = next(wrapper.model.parameters()).device.type == "cuda"
        self.phase: str | None = None
        self._in_generator = 0
        self._stack: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []

    def open(self, label: str) -> Any:
        if self.cuda:
            torch.cuda.synchronize()
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

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """A range named ``phase``, inside which the hooks mark what runs."""
        self.phase = phase
        try:
            with self.range(phase):
                yield
        finally:
            self.phase = None

    def _is_classifier(self, module: nn.Module) -> bool:
        """The classifier itself, or higher's patched copy of it (same class); not the generator's copy."""
        generator = self.wrapper.generator
        return isinstance(module, type(self.wrapper.model)) and module is not getattr(generator, "network", None)

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module is self.wrapper.generator:
            self._in_generator += 1
        elif self.phase is not None and not self._in_generator and self._is_classifier(module):
            self._stack.append((module, self.open(CLASSIFIER_FORWARD)))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is self.wrapper.generator:
            self._in_generator -= 1
        elif self._stack and self._stack[-1][0] is module:
            self.close(self._stack.pop()[1])

    def _optimizer_hooks(self, optimizer: torch.optim.Optimizer | None, label: str) -> list[Any]:
        if optimizer is None:
            return []
        state: dict[str, Any] = {}

        def pre(*_: Any) -> None:
            if self.phase is not None:
                state["rf"] = self.open(label)

        def post(*_: Any) -> None:
            if "rf" in state:
                self.close(state.pop("rf"))

        return [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def __enter__(self) -> Self:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        self._handles += self._optimizer_hooks(self.optimizer, OPTIMIZER_STEP)
        self._handles += self._optimizer_hooks(self.wrapper.generator_optimizer, GENERATOR_OPTIMIZER_STEP)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def iteration(self, x: Tensor, y: Tensor) -> None:
        """One MAXL iteration as a user writes it, labelled: the model step, then the meta step."""
        with self.range(ITERATION):
            with self.in_phase(MODEL_PHASE):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.wrapper.loss(x, y)
                with self.range(BACKWARD):
                    loss.backward()
                self.optimizer.step()
            with self.in_phase(META_PHASE):
                self.wrapper.meta_step(x, y)

    def step(self, x: Tensor, y: Tensor) -> None:
        """One ``wrapper.step`` (model step and meta step sharing their work), labelled."""
        with self.in_phase(STEP_PHASE):
            self.wrapper.step(x, y, self.optimizer)


# --------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class LabelledRange:
    """One labelled range of a profile: ``key`` names it after its phase (``"meta step: auxlab.targets"``;
    a round's or a phase's own range by its name), ``parent`` is the key of the nearest labelled range
    around it, ``round`` the profiled round it ran in."""

    key: str
    parent: str | None
    round: int
    event: Any


def _labelled_chain(event: Any) -> list[Any]:
    """``event`` and the labelled ranges around it, innermost first."""
    chain = [event]
    parent = event.cpu_parent
    while parent is not None:
        if is_label(parent.name):
            chain.append(parent)
        parent = parent.cpu_parent
    return chain


def _start(event: Any) -> float:
    return float(event.time_range.start)


def _forward_names(events: list[Any]) -> dict[int, str]:
    """What each classifier forward pass of a meta step or a step was for, by the event's id (see the module's doc)."""
    names: dict[int, str] = {}
    seen: Counter[int] = Counter()  # forward passes named in order so far, per phase range
    for event in sorted((e for e in events if e.name == CLASSIFIER_FORWARD), key=_start):
        around = _labelled_chain(event)[1:]
        phase = next((e for e in around if e.name in PHASES), None)
        if phase is None or phase.name == MODEL_PHASE:
            continue
        if any(e.name == TARGETS for e in around):
            names[id(event)] = TARGETS_FORWARD
        elif any(e.name == DIRECTIONAL_DERIVATIVE for e in around):
            names[id(event)] = DERIVATIVE_FORWARDS
        else:
            n = seen[id(phase)]
            seen[id(phase)] += 1
            names[id(event)] = FORWARDS[n] if n < len(FORWARDS) else DERIVATIVE_FORWARDS
    return names


def labelled_ranges(events: Iterable[Any]) -> list[LabelledRange]:
    """The labelled ranges among a profile's ``events`` that ran inside a round (:data:`ROUNDS`)."""
    events = list(events)
    round_of: dict[int, int] = {}
    for top in ROUNDS:
        round_of.update({id(e): i for i, e in enumerate(sorted((e for e in events if e.name == top), key=_start))})
    forward_names = _forward_names(events)

    def key(chain: list[Any]) -> str:
        """The key of ``chain[0]``, given the labelled ranges around it (``chain[1:]``, innermost first)."""
        name = forward_names.get(id(chain[0]), chain[0].name)
        if name in ROUNDS or name in PHASES:
            return str(name)
        phase = next((e.name for e in chain[1:] if e.name in PHASES), None)
        return name if phase is None else f"{phase}: {name}"

    found = []
    for event in events:
        if not is_label(event.name):
            continue
        chain = _labelled_chain(event)
        if id(chain[-1]) in round_of:
            found.append(LabelledRange(key(chain), key(chain[1:]) if len(chain) > 1 else None, round_of[id(chain[-1])], event))
    return found


@dataclass
class EngineProfile:
    """Where the time of the profiled rounds went, by labelled range (keys of :class:`LabelledRange`).

    ``durations_ms``: each range's wall-clock time on the calling thread in each round (summed when
    it ran several times in one round); ``counts``: how many times it ran, over all rounds;
    ``order``: the keys in the order they first ran; ``parents``: the key of the range around each
    one; ``broken_down``: the library's gradients and products, for which ``inside`` and ``nodes``
    give the self CPU time of each op and the total CPU time of each kind of autograd node that ran
    inside them (median per round); ``table``: the profiler's top ops.
    """

    durations_ms: dict[str, list[float]]
    counts: dict[str, int]
    order: list[str]
    parents: dict[str, str | None]
    broken_down: list[str]
    inside: dict[str, dict[str, float]]
    nodes: dict[str, dict[str, float]]
    table: str

    @property
    def per_iteration_ms(self) -> dict[str, float]:
        return {key: statistics.median(ms) for key, ms in self.durations_ms.items()}

    @property
    def library_labelled(self) -> bool:
        """Whether any range came from the library (an auxlab without ``record_function`` ranges has none)."""
        return any(key.rsplit(": ", 1)[-1].startswith(LIBRARY_PREFIX) for key in self.counts)


def _medians(per_round: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {key: {name: statistics.median(ms) for name, ms in values.items()} for key, values in per_round.items()}


def read_profile(prof: Any, iterations: int, *, sort_by: str = "self_cpu_time_total", row_limit: int = 25) -> EngineProfile:
    """An :class:`EngineProfile` of ``prof`` (a finished ``torch.profiler.profile``) over ``iterations`` rounds."""
    events = list(prof.events())
    ranges = labelled_ranges(events)
    durations: dict[str, list[float]] = {}
    first_start: dict[str, float] = {}
    parents: dict[str, str | None] = {}
    for r in ranges:
        durations.setdefault(r.key, [0.0] * iterations)[r.round] += r.event.cpu_time_total / 1e3
        first_start[r.key] = min(first_start.get(r.key, math.inf), _start(r.event))
        parents.setdefault(r.key, r.parent)
    order = sorted(durations, key=first_start.__getitem__)
    # the ops and autograd nodes inside each broken-down range: those whose nearest broken-down ancestor it is
    detailed = {id(r.event): r for r in ranges if is_broken_down(r.event.name)}
    inside: dict[str, dict[str, list[float]]] = {r.key: {} for r in detailed.values()}
    nodes: dict[str, dict[str, list[float]]] = {r.key: {} for r in detailed.values()}
    for event in events:
        if is_label(event.name):
            continue
        ancestor = event.cpu_parent
        while ancestor is not None and id(ancestor) not in detailed:
            ancestor = ancestor.cpu_parent
        if ancestor is None:
            continue
        r = detailed[id(ancestor)]
        inside[r.key].setdefault(event.name, [0.0] * iterations)[r.round] += event.self_cpu_time_total / 1e3
        if event.name.startswith(NODE_PREFIX):
            nodes[r.key].setdefault(event.name[len(NODE_PREFIX):], [0.0] * iterations)[r.round] += event.cpu_time_total / 1e3
    return EngineProfile(
        durations_ms=durations,
        counts=dict(Counter(r.key for r in ranges)),
        order=order,
        parents=parents,
        broken_down=[key for key in order if key in inside],
        inside=_medians(inside),
        nodes=_medians(nodes),
        table=prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=60),
    )


# --------------------------------------------------------------------------------------- profiling
def launch_blocking_for_cuda_profiles() -> None:
    """Make CUDA kernel launches synchronous (``CUDA_LAUNCH_BLOCKING=1``), so that the library's ranges,
    which this benchmark cannot synchronize, cover the kernels they launch. Works only before CUDA starts."""
    os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")


def profile_engine(config: Config, engine: str, *, iterations: int = 3, row_limit: int = 25) -> EngineProfile:
    """Profile ``iterations`` rounds with ``engine``, after ``config.warmup`` (at least one) unprofiled ones.

    A round is a single-task step, a labelled MAXL iteration and, for the engines that share work
    between the two steps, a labelled ``wrapper.step``; the wrapper uses ``config.generators[0]``.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(config.device)
    x, y = make_batch(config, device)
    base = base_model(config, device)
    plain = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=config.lr)
    wrapper = make_wrapper(base, config, config.generators[0], engine)
    labeller = Labeller(wrapper, torch.optim.SGD(wrapper.parameters(), lr=config.lr))
    shared = ENGINES[engine].shares_gradient

    def one_round() -> None:
        with labeller.range(SINGLE):
            single_task_step(plain, plain_opt, x, y)
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
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return read_profile(prof, iterations, sort_by=sort_by, row_limit=row_limit)
