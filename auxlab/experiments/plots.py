"""PNG plots of an experiment: accuracy curves, the label-collapse diagnostic, and a grid of sub-classes.

matplotlib is an optional dependency (``pip install "auxlab[plot]"``), imported inside each
function. Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas, not ``pyplot``,
so plotting neither needs a display nor changes the caller's matplotlib backend or state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["plot_accuracy_curves", "plot_collapse", "plot_subclass_grid"]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('the experiment plots need matplotlib: pip install "auxlab[plot]" (or pip install matplotlib), '
                          "or run without plots (--no-plots)") from error
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _by_epoch(records: Sequence[dict[str, Any]], strategy: str, key: str) -> tuple[list[int], Tensor, Tensor]:
    """Epochs and the mean and standard deviation over seeds of ``key`` at each epoch."""
    runs = [r for r in records if r["strategy"] == strategy and r.get(key) is not None]
    epochs = sorted({r["epoch"] for r in runs})
    means, stds = [], []
    for epoch in epochs:
        values = torch.tensor([float(r[key]) for r in runs if r["epoch"] == epoch], dtype=torch.float64)
        means.append(values.mean())
        stds.append(values.std() if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64))
    return epochs, torch.stack(means), torch.stack(stds)


def plot_accuracy_curves(records: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Validation accuracy and validation loss per epoch, one line per strategy (mean over seeds, band ± 1 std).

    Validation, not test: the test set is read only after the last epoch. Epoch 0 (the untrained
    model) is left out, so that the scale shows the differences between trained models.
    """
    records = [r for r in records if r["epoch"] > 0]
    figure = _figure(11, 4.2)
    acc_ax, loss_ax = figure.subplots(1, 2)
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    seeds = len({r["seed"] for r in records})
    for i, strategy in enumerate(strategies):
        for ax, key, scale in ((acc_ax, "val_acc", 100.0), (loss_ax, "val_loss", 1.0)):
            _curve(ax, records, strategy, key, color=f"C{i % 10}", scale=scale)
    band = f"mean over {seeds} seeds, band ± 1 std" if seeds > 1 else "1 seed"
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"Validation accuracy ({band})")
    loss_ax.set(xlabel="epoch", ylabel="validation cross entropy", title=f"Validation loss ({band})")
    epochs = sorted({r["epoch"] for r in records})
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        _epoch_ticks(ax, epochs)
    acc_ax.legend(title="strategy")
    if title:
        figure.suptitle(title)
    figure.savefig(path)
    return path


#: The label diagnostics :func:`plot_label_learning` draws, with their axis labels.
LABEL_CURVES = (
    ("confidence", "label confidence (mean largest probability)"),
    ("used_fraction", "share of the sub-classes in use"),
    ("fine_nmi", "NMI with the true fine labels (within class)"),
    ("generator_movement", "generator movement ||phi - phi0|| / ||phi0||"),
)


def plot_label_learning(records: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """Whether the labels learn, per epoch, one line per strategy that has them (mean over seeds, band
    ± 1 std): their confidence, the share of sub-classes in use, their NMI with the true fine labels
    (when the task has them) and the generator's movement (for a strategy that learns). None when no
    strategy has any of these (single task only)."""
    panels = [(key, label) for key, label in LABEL_CURVES if any(r.get(key) is not None for r in records)]
    if not panels:
        return None
    figure = _figure(4.4 * len(panels), 4.0)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    for i, strategy in enumerate(strategies):
        for ax, (key, _) in zip(axes, panels):
            if any(r.get(key) is not None for r in records if r["strategy"] == strategy):
                _curve(ax, records, strategy, key, color=f"C{i % 10}")
    epochs = sorted({r["epoch"] for r in records})
    for ax, (_, label) in zip(axes, panels):
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        _epoch_ticks(ax, epochs)
    axes[0].legend(title="strategy")
    if title:
        figure.suptitle(title)
    figure.savefig(path)
    return path


def _curve(ax: Any, records: Sequence[dict[str, Any]], strategy: str, key: str, *, color: str, scale: float = 1.0) -> None:
    """One strategy's ``key`` per epoch: the mean over seeds, and a band of ± 1 standard deviation."""
    epochs, mean, std = _by_epoch(records, strategy, key)
    ax.plot(epochs, scale * mean, marker="o", markersize=3, color=color, label=strategy)
    ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=color, alpha=0.15, linewidth=0)


#: Per primary class in :func:`plot_collapse`: a marker and a line style, so that lines that coincide stay apart.
CLASS_MARKERS = ("o", "s", "D", "^", "v", "p", "h", "<", ">", "8")
CLASS_LINESTYLES = ("-", "--", ":", "-.")


def plot_collapse(
    records: Sequence[dict[str, Any]], path: Path, *, psi: Sequence[int], class_names: Sequence[str], title: str = ""
) -> Path | None:
    """The label-collapse diagnostic of every strategy that learns its labels (e.g. maxl).

    One row of three panels per such strategy, from epoch 0 (before training) on, means over seeds:

    1. the sub-classes used by each primary class (argmax shares above half a uniform share; the
       dashed grey line is psi, nothing collapsed), drawn at their values: where classes coincide,
       their markers are concentric;
    2. the target confidence of each class, the mean largest probability of its soft targets (the
       dashed line is 1/psi, flat targets, where the argmax of panel 1 means little);
    3. each class's sub-class shares after the last epoch, sorted from largest to smallest before
       averaging over seeds (sub-class numbers are arbitrary).

    Returns None, writing nothing, if no strategy learns.
    """
    strategies = list(dict.fromkeys(r["strategy"] for r in records if r.get("labels") == "learned"))
    if not strategies:
        return None
    figure = _figure(17, 4.6 * len(strategies))
    axes = figure.subplots(len(strategies), 3, squeeze=False)
    num_classes = len(psi)
    uniform = len(set(psi)) == 1
    for row, strategy in enumerate(strategies):
        runs = [r for r in records if r["strategy"] == strategy]
        seeds = len({r["seed"] for r in runs})
        epochs = sorted({r["epoch"] for r in runs})
        used_ax, confidence_ax, share_ax = axes[row]
        for ax, key, label in (
            (used_ax, "subclasses_used", "sub-classes used"),
            (confidence_ax, "target_confidence", "mean largest target probability"),
        ):
            values = torch.tensor(
                [[[r[key][c] for r in runs if r["epoch"] == e] for e in epochs] for c in range(num_classes)], dtype=torch.float64
            ).mean(2)
            for c in range(num_classes):
                # The true values, no offset: classes whose lines coincide show as concentric hollow markers
                # (each class its own shape, the first the largest) on dashed and dotted lines.
                ax.plot(epochs, values[c], marker=CLASS_MARKERS[c % len(CLASS_MARKERS)],
                        markersize=3 + 10 * (num_classes - 1 - c) / max(num_classes - 1, 1), fillstyle="none",
                        linestyle=CLASS_LINESTYLES[c % len(CLASS_LINESTYLES)], linewidth=1, color=f"C{c % 10}",
                        label=_name(class_names, c))
            ax.plot(epochs, values.mean(0), color="black", linewidth=2.5, alpha=0.4, zorder=1.5, label="mean")  # under the classes
            ax.set(xlabel="epoch (0: before training)", ylabel=label)
            _epoch_ticks(ax, epochs)
            ax.grid(alpha=0.3)
        if uniform:
            reference = used_ax.axhline(psi[0], color="grey", linestyle="--", linewidth=1, label=f"psi = {psi[0]} (all used)")
            used_ax.legend(handles=[reference], fontsize=7, loc="lower right")
            confidence_ax.axhline(1 / psi[0], color="grey", linestyle=":", linewidth=1, label=f"1/psi = {1 / psi[0]:.2g} (flat)")
        used_ax.set(ylim=(0, max(psi) + 0.5), title=f"{strategy}: sub-classes used per class ({seeds} seed(s))")
        used_ax.yaxis.get_major_locator().set_params(integer=True)
        confidence_ax.set(ylim=(0, 1.02), title=f"{strategy}: confidence of the soft targets")
        confidence_ax.legend(fontsize=7, title="primary class", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

        last = [r for r in runs if r["epoch"] == epochs[-1]]
        bottom = torch.zeros(num_classes, dtype=torch.float64)
        for j in range(max(psi)):
            share = torch.tensor(
                [sum(sorted(r["subclass_share"][c], reverse=True)[j] if j < psi[c] else 0.0 for r in last) / len(last)
                 for c in range(num_classes)],
                dtype=torch.float64,
            )
            share_ax.bar(range(num_classes), 100 * share, bottom=100 * bottom, color=f"C{j % 10}", edgecolor="white",
                         linewidth=0.5, label=f"{_ordinal(j + 1)} largest")
            bottom += share
        share_ax.set_xticks(range(num_classes), [_name(class_names, c) for c in range(num_classes)], rotation=30, ha="right")
        share_ax.set(ylabel="share of the class's probe samples (%)", ylim=(0, 100),
                     title=f"{strategy}: argmax sub-class shares after epoch {epochs[-1]}")
        share_ax.legend(fontsize=7, title="sub-class", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        figure.suptitle(title)
    figure.savefig(path)
    return path


def plot_subclass_grid(
    images: Tensor,
    labels: Tensor,
    columns: Tensor,
    *,
    psi: Sequence[int],
    class_names: Sequence[str],
    path: Path,
    num_classes_shown: int = 4,
    images_per_row: int = 8,
    title: str = "",
) -> Path:
    """Example images of each sub-class: what the generator groups together.

    For the first ``num_classes_shown`` primary classes with more than one sub-class (or the first
    classes, if none has), one row per sub-class, showing up to ``images_per_row`` of the samples
    whose argmax auxiliary label is that sub-class, with the sub-class's share of the class.

    Args:
        images: ``(M, C, H, W)`` images in ``[0, 1]``.
        labels: ``(M,)`` primary labels.
        columns: ``(M,)`` argmax auxiliary column of each image.
    """
    starts = [sum(psi[:c]) for c in range(len(psi))]
    candidates = [c for c in range(len(psi)) if psi[c] > 1] or list(range(len(psi)))
    shown = candidates[:num_classes_shown]
    channels, height, width = (int(s) for s in images.shape[1:])
    pad, gap = max(1, height // 8), max(2, height // 2)
    rows: list[tuple[int, int, Tensor, float]] = []
    for c in shown:
        in_class = labels == c
        total = int(in_class.sum())
        for j in range(psi[c]):
            members = torch.nonzero(in_class & (columns == starts[c] + j)).squeeze(1)[:images_per_row]
            share = int((in_class & (columns == starts[c] + j)).sum()) / total if total else 0.0
            rows.append((c, j, members, share))
    # One mosaic image, white between tiles and a wider gap between primary classes: one imshow, not one Axes per tile.
    canvas_height = pad + len(rows) * (height + pad) + gap * (len(shown) - 1)
    canvas = torch.ones(channels, canvas_height, pad + images_per_row * (width + pad))
    centres, names, empty = [], [], []
    y = pad
    for i, (c, j, members, share) in enumerate(rows):
        if i and rows[i - 1][0] != c:
            y += gap
        for k, m in enumerate(members.tolist()):
            x = pad + k * (width + pad)
            canvas[:, y : y + height, x : x + width] = images[m].detach().float().cpu().clamp(0, 1)
        if members.numel() == 0:
            empty.append(y + height / 2)
        centres.append(y + (height - 1) / 2)
        names.append(f"{_name(class_names, c)} / sub-class {j + 1} ({share:.0%})")
        y += height + pad
    figure = _figure(2.4 + 0.55 * images_per_row, 0.9 + 0.5 * len(rows))
    ax = figure.subplots()
    if channels == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    for centre in empty:
        ax.text(pad, centre, "unused", va="center", ha="left", fontsize=8, color="grey")
    ax.set_yticks(centres, names, fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title((title + "\n" if title else "") + f"one row per sub-class (share of the class's probe samples); up to {images_per_row} examples each",
                 fontsize=9)
    figure.savefig(path)
    return path


def _epoch_ticks(ax: Any, epochs: Sequence[int]) -> None:
    if len(epochs) <= 15:
        ax.set_xticks(list(epochs))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _name(class_names: Sequence[str], c: int) -> str:
    return class_names[c] if c < len(class_names) else str(c)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
