"""What the runner measures after every epoch: accuracies, the weighting's parameters, the label-collapse diagnostic.

The diagnostic asks the generator for the distribution each sample's auxiliary label comes from
(:meth:`~auxlab.AuxLabelGenerator.label_distribution`: the targets, or a policy's probabilities),
on what the generator reads (the inputs, or the classifier's features for one that
``reads_features``), without moving anything of the run: no gradient, no BatchNorm statistic, no
draw from the generator's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from auxlab.datasets import ImageDataset
from auxlab.experiments.config import ExperimentConfig
from auxlab.experiments.tasks import TaskData
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["accuracies", "collapse_diagnostic", "evaluate", "weighting_params"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int,
    device: torch.device,
    logits: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross entropy of ``model`` (in eval mode) on ``dataset``; the model's mode is restored.

    ``logits`` maps a batch to the ``(B, C)`` scores to judge, in place of ``model`` itself: e.g.
    ``evaluate(wrapper, data, ..., logits=wrapper.aggregated_logits)`` for SLA's aggregated inference.
    """
    predict = logits if logits is not None else model
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            y = dataset.labels[start : start + batch_size].to(device)
            scores = predict(x)
            correct += int((scores.argmax(1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(scores, y, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


def accuracies(
    wrapper: MetaAuxWrapper, data: TaskData, config: ExperimentConfig, device: torch.device, *, test: bool, aggregated: bool
) -> dict[str, float | None]:
    """Validation accuracy and loss of the classifier, test accuracy and loss when ``test``; with
    ``aggregated``, the validation (and test) accuracy of the wrapper's aggregated inference too."""
    values: dict[str, float | None] = dict.fromkeys(
        ("val_acc", "val_loss", "test_acc", "test_loss", "val_acc_aggregated", "test_acc_aggregated")
    )
    for split, dataset in (("val", data.val), ("test", data.test)):
        if split == "test" and not test:
            continue
        values[f"{split}_acc"], values[f"{split}_loss"] = evaluate(wrapper.model, dataset, batch_size=config.eval_batch_size, device=device)
        if aggregated:
            values[f"{split}_acc_aggregated"], _ = evaluate(
                wrapper, dataset, batch_size=config.eval_batch_size, device=device, logits=wrapper.aggregated_logits
            )
    return values


def weighting_params(wrapper: MetaAuxWrapper) -> dict[str, list[float]] | None:
    """The weighting's parameters by name, flattened (maoal's ``weights``, uncertainty's ``log_variances``); None without any."""
    values = {name: [float(v) for v in p.detach().flatten().cpu()] for name, p in wrapper.weighting.named_parameters()}
    return values or None


def collapse_diagnostic(
    wrapper: MetaAuxWrapper, dataset: ImageDataset, indices: Tensor, *, batch_size: int, device: torch.device
) -> tuple[dict[str, Any], Tensor]:
    """How many of its sub-classes each primary class actually uses, and how sure the labels are.

    Every probe sample (``indices`` into ``dataset``, the training split) gets the distribution its
    auxiliary label comes from, ``wrapper.aux_targets(..., distribution=True)`` (the generator's targets, run in its
    current mode without updating its statistics; for a policy that draws its labels, ``"rl"``, the
    policy's probabilities, its targets being one draw from them, and no random number is drawn).
    For primary class ``c`` with ``n_c`` probe samples:

    - ``share[c][j]``: the fraction of the ``n_c`` samples whose argmax is sub-class ``j`` of block ``c``;
    - ``used[c]``: the number of sub-classes with ``share > 1 / (2 psi[c])``, i.e. more than half of
      the share a uniform spread would give them (``psi[c]`` when all are in use, 1 when collapsed);
    - ``entropy[c]``: ``-sum_j share[c][j] ln share[c][j]`` in nats, from 0 (collapsed) to ``ln psi[c]``;
    - ``confidence[c]``: the mean over the ``n_c`` samples of their target's largest probability,
      from ``1 / psi[c]`` (flat soft targets: the argmax says little) to 1 (hard labels);
    - ``soft_share[c][j]``: the mean probability of sub-class ``j`` over the ``n_c`` samples.

    A class with no probe sample has all of these 0.

    Returns:
        ``(diagnostic, columns)``: ``diagnostic`` holds ``subclass_share``, ``subclasses_used``,
        ``subclass_entropy``, ``target_confidence`` and ``subclass_soft_share`` (per class, as above);
        ``columns`` is the ``(M,)`` argmax auxiliary column of each probe sample.

    Raises:
        ValueError: for a single-task wrapper, which has no auxiliary labels.
    """
    generator = wrapper.generator
    if generator is None:
        raise ValueError("generator='single' trains without auxiliary labels; there are no targets")
    mask = wrapper.mask
    pieces = []
    for start in range(0, indices.shape[0], batch_size):
        index = indices[start : start + batch_size]
        x, y = dataset.images[index].to(device), dataset.labels[index].to(device)
        pieces.append(wrapper.aux_targets(x, y, index=index.to(device), distribution=True).double().cpu())
    targets = torch.cat(pieces)
    columns = targets.argmax(1)
    labels = dataset.labels[indices]
    shares, used, entropy, confidence, soft = [], [], [], [], []
    for c, size in enumerate(mask.psi):
        block = mask.block(c)
        in_class = labels == c
        count = torch.bincount(columns[in_class] - block.start, minlength=size).double()
        share = count / count.sum() if count.sum() > 0 else count
        shares.append([float(s) for s in share])
        used.append(int((share > 1.0 / (2 * size)).sum()))
        entropy.append(float(-sum(s * math.log(s) for s in share.tolist() if s > 0)))
        probabilities = targets[in_class][:, block.start : block.stop]
        present = probabilities.shape[0] > 0
        confidence.append(float(probabilities.max(1).values.mean()) if present else 0.0)
        soft.append([float(p) for p in probabilities.mean(0)] if present else [0.0] * size)
    diagnostic = {
        "subclass_share": shares,
        "subclasses_used": used,
        "subclass_entropy": entropy,
        "target_confidence": confidence,
        "subclass_soft_share": soft,
    }
    return diagnostic, columns
