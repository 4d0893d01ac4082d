"""The losses of auxiliary learning, each written once: classification (optionally focal) and the
generator's entropy regulariser."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["classification_loss", "model_step_losses", "negative_batch_entropy", "negative_entropy", "soft_target_coefficients"]


def classification_loss(logits: Tensor, target: Tensor, *, focal_gamma: float = 0.0) -> Tensor:
    """Batch-mean cross entropy, or focal loss when ``focal_gamma > 0``.

    ``loss_b = -sum_k t_bk (1 - p_bk)^gamma log p_bk`` with ``p = softmax(logits)``; ``gamma = 0`` is
    plain cross entropy. The paper (Liu et al., 2019) used ``gamma = 2`` on both heads.

    Args:
        logits: ``(B, K)`` unnormalised scores.
        target: ``(B,)`` integer class labels, or ``(B, K)`` target probabilities (soft labels).
        focal_gamma: focusing parameter, >= 0.

    Returns:
        A scalar tensor: the mean over the batch.
    """
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0 (0 is plain cross entropy), got {focal_gamma}")
    expected = logits.shape[:1] if not target.is_floating_point() else logits.shape
    if logits.dim() != 2 or target.shape != expected:
        kind = "integer labels of shape (B,)" if not target.is_floating_point() else "probabilities of shape (B, K)"
        raise ValueError(
            f"target must be {kind} for logits of shape (B, K); got logits {tuple(logits.shape)} and "
            f"{target.dtype} target {tuple(target.shape)}"
        )
    log_p = _log_softmax(logits)
    if not target.is_floating_point():
        log_p = log_p.gather(1, target[:, None]).squeeze(1)
        if focal_gamma:
            log_p = _focal_factor(log_p, focal_gamma) * log_p
        return -log_p.mean()
    return (target * soft_target_coefficients(logits, focal_gamma=focal_gamma, log_p=log_p)).sum()


def model_step_losses(primary: Tensor, y: Tensor, aux: Tensor, targets: Tensor, *, focal_gamma: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(L_pri, L_aux)``: the primary head's loss on labels ``y`` and the auxiliary head's on soft ``targets``.

    The model step minimises ``L_pri + aux_weight * L_aux``, and so does the meta step's virtual step.

    Args:
        primary: ``(B, C)`` primary logits.
        y: ``(B,)`` labels.
        aux: ``(B, K)`` auxiliary logits.
        targets: ``(B, K)`` auxiliary target probabilities.
        focal_gamma: focusing parameter of both losses.
    """
    return (
        classification_loss(primary, y, focal_gamma=focal_gamma),
        classification_loss(aux, targets, focal_gamma=focal_gamma),
    )


def soft_target_coefficients(logits: Tensor, *, focal_gamma: float = 0.0, log_p: Tensor | None = None) -> Tensor:
    """``c`` such that the soft-target loss is ``classification_loss(logits, t) == (t * c).sum()``.

    The loss against soft targets ``t`` is linear in ``t``, with coefficients
    ``c_bk = -(1 - p_bk)^gamma log p_bk / B``. The meta step uses this: the hypergradient with
    respect to the targets is a directional derivative of ``c`` (no double backward needed).

    Args:
        logits: ``(B, K)`` unnormalised scores.
        focal_gamma: focusing parameter, >= 0.
        log_p: ``log_softmax(logits, 1)`` when the caller has it already.

    Returns:
        ``(B, K)`` coefficients.
    """
    if log_p is None:
        log_p = _log_softmax(logits)
    if focal_gamma:
        log_p = _focal_factor(log_p, focal_gamma) * log_p
    return log_p / -logits.shape[0]


def _log_softmax(logits: Tensor) -> Tensor:
    """Row-wise log-softmax; half-precision logits (e.g. under autocast) are computed in float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return torch.log_softmax(logits, dim=1, dtype=torch.float32)
    return torch.log_softmax(logits, dim=1)


def _focal_factor(log_p: Tensor, gamma: float) -> Tensor:
    """``(1 - p)^gamma``, with a zero (not NaN) gradient where ``p == 1`` exactly and ``gamma < 1``."""
    return (1.0 - log_p.exp()).clamp_min(torch.finfo(log_p.dtype).tiny).pow(gamma)


def negative_batch_entropy(probs: Tensor) -> Tensor:
    """``sum_k pbar_k log pbar_k`` with ``pbar`` the batch mean of ``probs``: minus the entropy of the
    batch's mean label distribution (:func:`negative_entropy` of ``probs.mean(0)``).

    Minimising it spreads a batch over the auxiliary classes (MAXL's regulariser against collapse).

    Args:
        probs: ``(B, K)`` probabilities.

    Returns:
        A scalar tensor, <= 0.
    """
    return negative_entropy(probs.mean(dim=0))


def negative_entropy(distribution: Tensor) -> Tensor:
    """``sum_k p_k log p_k`` of a ``(K,)`` probability vector: minus its entropy.

    Entries with ``p_k == 0`` exactly (a class absent from the batch) count 0 in value and in
    gradient, so a short batch never turns the generator NaN.
    """
    present = distribution > 0
    safe = torch.where(present, distribution, torch.ones_like(distribution))
    return torch.where(present, distribution * safe.log(), torch.zeros_like(distribution)).sum()
