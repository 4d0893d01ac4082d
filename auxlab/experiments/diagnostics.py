"""What the runner measures after every epoch: accuracies, the weighting's parameters, the label-collapse diagnostic.

The diagnostic asks the generator for the distribution each sample's auxiliary label comes from
(:meth:`~auxlab.AuxLabelGenerator.label_distribution`: the targets, or a policy's probabilities),
on what the generator reads (the inputs, or the classifier's features for one that
``reads_features``), without moving anything of the run: no gradient, no BatchNorm statistic, no
draw from the generator's random stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from auxlab.datasets import ImageDataset
from auxlab.diagnostics import hypergradient_parts, label_statistics, parameter_movement
from auxlab.experiments.config import ExperimentConfig
from auxlab.experiments.tasks import TaskData
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["LEARNING_DIAGNOSTICS", "accuracies", "collapse_diagnostic", "evaluate", "learning_diagnostics", "recalibrate_batchnorm", "weighting_params"]

#: The record keys of :func:`learning_diagnostics`.
LEARNING_DIAGNOSTICS = ("generator_movement", "meta_primary_norm", "meta_entropy_norm", "meta_cosine")

#: Probe samples on which :func:`learning_diagnostics` measures the meta objective's gradients.
_GRADIENT_PROBE = 256


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
    """How the auxiliary labels of the probe samples use the sub-classes, how sure they are, and (with
    the dataset's fine labels) how they agree with them: :func:`auxlab.diagnostics.label_statistics`.

    Every probe sample (``indices`` into ``dataset``, the training split) gets the distribution its
    auxiliary label comes from, ``wrapper.aux_targets(..., distribution=True)`` (the generator's targets,
    run in its current mode without updating its statistics; for a policy that draws its labels,
    ``"rl"``, the policy's probabilities, and no random number is drawn).

    Returns:
        ``(diagnostic, distribution)``: the statistics (per class: ``subclass_share``,
        ``subclasses_used``, ``subclass_entropy``, ``target_confidence``, ``subclass_soft_share``; over
        all: ``confidence``, ``used_fraction``, ``batch_entropy`` and, with fine labels, ``fine_nmi``)
        and the ``(M, K)`` distributions (their argmax is each sample's auxiliary column).

    Raises:
        ValueError: for a single-task wrapper, which has no auxiliary labels.
    """
    if wrapper.generator is None:
        raise ValueError("generator='single' trains without auxiliary labels; there are no targets")
    pieces = []
    for start in range(0, indices.shape[0], batch_size):
        index = indices[start : start + batch_size]
        x, y = dataset.images[index].to(device), dataset.labels[index].to(device)
        pieces.append(wrapper.aux_targets(x, y, index=index.to(device), distribution=True).double().cpu())
    distribution = torch.cat(pieces)
    fine = dataset.fine_labels[indices] if dataset.fine_labels is not None else None
    diagnostic = label_statistics(distribution, dataset.labels[indices], wrapper.mask, fine_labels=fine)
    return diagnostic, distribution



def learning_diagnostics(
    wrapper: MetaAuxWrapper, initial: dict[str, Tensor], data: TaskData, probe: Tensor, config: ExperimentConfig, device: torch.device
) -> dict[str, float | None]:
    """How the meta learner moves: ``generator_movement``, the relative distance of its parameters from
    ``initial`` (:func:`auxlab.diagnostics.parameter_movement`), and, for a learner whose objective is a
    primary term and an entropy regulariser (MAXL's, DTG-AuxL's), the norms of their gradients and the
    cosine of the primary one with the regularisers' on the first probe samples
    (:func:`auxlab.diagnostics.hypergradient_parts`). None where they do not apply."""
    values: dict[str, float | None] = dict.fromkeys(LEARNING_DIAGNOSTICS)
    learner = wrapper.meta_learner
    if learner is None:
        return values
    values["generator_movement"] = parameter_movement(learner.owner, initial)
    index = probe[:_GRADIENT_PROBE]
    x, y = data.train.images[index].to(device), data.train.labels[index].to(device)
    try:
        parts = hypergradient_parts(wrapper, x, y, index=index.to(device))
    except ValueError:  # a learner with no primary and regulariser terms (REINFORCE, module weights)
        return values
    values.update(meta_primary_norm=parts["primary_norm"], meta_entropy_norm=parts.get("entropy_norm"), meta_cosine=parts["cosine"])
    return values


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: ImageDataset, *, batch_size: int, device: torch.device) -> None:
    """Recompute ``model``'s BatchNorm running statistics at its current weights: reset them and
    average the batch statistics of one pass over ``dataset`` in order
    (``torch.optim.swa_utils.update_bn``). The model's mode is restored; no random number is drawn."""
    batches = [dataset.images[start : start + batch_size] for start in range(0, len(dataset), batch_size)]
    torch.optim.swa_utils.update_bn(batches, model, device=device)
