"""Timing and memory: every variant in one round-robin, and each one's peak memory."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch

from benchmarks.step_cost.config import SINGLE, Config
from benchmarks.step_cost.machine import auxlab_version, loadavg
from benchmarks.step_cost.variants import build_variants, make_batch


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
    load_before = loadavg()
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
        load_after = loadavg()
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
