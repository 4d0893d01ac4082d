"""Markdown output: the timing table and the profile, each under a header that says what ran, how and where."""

from __future__ import annotations

import datetime
import statistics

import torch

from benchmarks.step_cost.config import AUTOCAST_DTYPES, SINGLE, Config
from benchmarks.step_cost.machine import machine_description
from benchmarks.step_cost.profiling import ITERATION, LIBRARY_RANGES, EngineProfile
from benchmarks.step_cost.timing import Result

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


# --------------------------------------------------------------------------------------- timing
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


# --------------------------------------------------------------------------------------- profile
def inside_markdown(label: str, ops: dict[str, float], total_ms: float, top: int = 12, *, what: str = "op", time: str = "self CPU") -> str:
    """The ops (or autograd nodes) with the most time inside the range ``label``: median per iteration, and its
    share of the range's median ``total_ms`` (medians do not add up exactly)."""
    lines = [f"| {what} inside '{label}' | {time} ms / iteration | share of the range |", "|---|---:|---:|"]
    for name, ms in sorted(ops.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| `{name}` | {ms:.1f} | {ms / total_ms:.0%} |")
    return "\n".join(lines)


def breakdown_markdown(profile: EngineProfile) -> str:
    """The labelled ranges as a table: median ms per iteration, as a share of the MAXL iteration's median
    and as a multiple of the single-task step's median; each range's parts below it, in the order they ran.

    After a range's parts comes its 'rest': its time that none of its parts covers (median over iterations).
    """
    durations, median = profile.durations_ms, profile.per_iteration_ms
    iteration = median.get(ITERATION, float("nan"))
    single = median.get(SINGLE, float("nan"))
    lines = ["| part | ms / iteration | share of MAXL iteration | x single-task step |", "|---|---:|---:|---:|"]

    def add(label: str, ms: float, level: int) -> None:
        lines.append(f"| {'&nbsp;' * 4 * level}{label} | {ms:.1f} | {ms / iteration:.0%} | {ms / single:.2f} |")

    def emit(key: str, level: int) -> None:
        add(key, median[key], level)
        parts = [child for child in profile.order if profile.parents.get(child) == key]
        for part in parts:
            emit(part, level + 1)
        if parts:
            rest = [whole - sum(p) for whole, *p in zip(durations[key], *(durations[q] for q in parts))]
            add(f"{key}: rest (unlabelled)", statistics.median(rest), level + 1)

    for key in profile.order:
        if profile.parents.get(key) is None:
            emit(key, 0)
    return "\n".join(lines)


def profile_markdown(config: Config, profiles: dict[str, EngineProfile], command: str, iterations: int, auxlab_version: str) -> str:
    device = torch.device(config.device)
    lines = _header(f"Profile: {config.model} on {config.device}", command, device, config, auxlab_version)
    lines += [
        f"- torch.profiler over {iterations} rounds per engine, after warm-up: a single-task step, a MAXL iteration",
        "  (`loss` + `backward` + `opt.step`, then `meta_step`) and, for the engines whose work the two steps can",
        "  share, a `wrapper.step`; each part's time is its median over the rounds",
        "",
        "The `auxlab.*` parts are the library's own `torch.profiler.record_function` ranges:",
        "",
        *(f"- `{name}`: {what}" for name, what in LIBRARY_RANGES.items()),
        "",
        "The benchmark adds its own ranges around each round's parts (the model step, its `backward`, the meta step,",
        "`wrapper.step`), module forward hooks that mark the classifier's forward passes, and optimizer step hooks.",
        "In a meta step or a step, a classifier forward pass is named by where it ran: inside `auxlab.targets` (the",
        "features a generator reads), inside `auxlab.directional_derivative`, or else in order: at theta, at theta',",
        "then any further ones. A part is named after the",
        "phase it ran in and listed under the labelled range around it. Times are wall-clock ranges on the calling",
        "thread under the profiler, which adds overhead per op, so read the shares and multiples, not the absolute",
        "milliseconds. 'rest' is what no label inside a range covers.",
    ]
    if device.type == "cuda":
        lines += ["", "On CUDA the run sets CUDA_LAUNCH_BLOCKING=1, so that each range covers the kernels it launched."]
    if not any(p.library_labelled for p in profiles.values()):
        lines += ["", f"**No `auxlab.*` range was recorded**: this auxlab ({auxlab_version}) does not label its parts."]
    for engine, data in profiles.items():
        lines += ["", f"## Engine: {engine}", "", breakdown_markdown(data), ""]
        for key in data.broken_down:
            total = data.per_iteration_ms[key]
            lines += [inside_markdown(key, data.nodes[key], total, 8, what="autograd node", time="total CPU"), ""]
            lines += [inside_markdown(key, data.inside[key], total, 8), ""]
        unit = "CUDA" if device.type == "cuda" else "CPU"
        lines += [f"Top ops by self {unit} time (all {iterations} rounds together):", ""]
        lines += ["```", data.table.rstrip(), "```"]
    return "\n".join(lines) + "\n"
