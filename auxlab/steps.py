"""The model step, and how one call of :meth:`~auxlab.MetaAuxWrapper.step` or
:meth:`~auxlab.MetaAuxWrapper.meta_step` runs: written once, for every strategy and weighting."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from auxlab._gradients import attach_gradient, combined_gradients, detached
from auxlab.context import Batch, StepContext, strategy_name
from auxlab.engines import separate_gradients
from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep
from auxlab.losses import classification_loss
from auxlab.multitask import call_on_buffer_copies, commit_buffers

__all__ = ["finish", "loss", "meta_step", "model_loss", "step", "zero_loss"]


def model_loss(ctx: StepContext, x: Tensor, y: Tensor, index: Tensor | None) -> tuple[Tensor, dict[str, Tensor], bool]:
    """The model step's loss ``L_pri + aux_weight * L_aux`` (as the weighting combines it, plus a
    strategy's extra term), the network's updated buffers, and whether the loss was finite.

    The targets are detached: the loss reaches the classifier, the auxiliary head and a weighting's
    own parameters only. A gradient-level weighting's loss carries the weighted gradient
    (:func:`~auxlab._gradients.attach_gradient`). Nothing is committed here.
    """
    generator = ctx.generator
    if generator is None:
        (primary, _), buffers = call_on_buffer_copies(ctx.net, x, with_aux=False)
        ctx.check_primary(primary, x)
        loss = classification_loss(primary, y, focal_gamma=ctx.focal_gamma)
        return loss, buffers, ctx.guard.check("model", loss, **{"primary loss": loss})
    x_aux, y_aux = ctx.augmented(x, y)
    (primary, aux, *features), buffers = call_on_buffer_copies(ctx.net, x_aux, with_features=generator.reads_features)
    primary = primary[: x.shape[0]]  # with an augmenting strategy, the rows of the untransformed batch
    ctx.check_primary(primary, x)
    with torch.no_grad():
        targets = ctx.targets(x_aux, y_aux if y_aux is not None else y, index, features[0] if features else None)[0]
    primary_loss, aux_loss = ctx.loss_terms(primary, aux, y, targets)
    terms = {"primary loss": primary_loss, "auxiliary loss": aux_loss}
    extra = generator.extra_loss(primary, aux, y)
    if extra is not None:
        terms[f"{strategy_name(generator)} extra loss"] = extra
        primary_loss = primary_loss + extra  # counted with the primary loss by a gradient-level weighting
    loss = ctx.weighting.combine(primary_loss, aux_loss, ctx.aux_weight)
    if not ctx.guard.check("model", loss, **terms):
        return loss, buffers, False
    if ctx.weighting.needs_gradients:
        params = {name: p for name, p in ctx.net.named_parameters() if p.requires_grad}
        g_pri, g_aux = separate_gradients(primary_loss, aux_loss, params, ctx.scaling)
        with torch.no_grad():
            scales = detached(ctx.weighting.gradient_scales(g_pri, g_aux))
            grads = combined_gradients(g_pri, g_aux, ctx.aux_weight, scales, params)
        loss = attach_gradient(loss, list(params.values()), [grads[name] for name in params])
    return loss, buffers, True


def loss(ctx: StepContext, batch: Batch) -> Tensor:
    """:meth:`~auxlab.MetaAuxWrapper.loss`: :func:`model_loss`, whose buffers are committed if it is
    finite; a zero loss with zero gradients if it is not and ``nonfinite="skip"``."""
    with record_function("auxlab.loss"):
        ctx.reducer.warn_unaveraged_loss()
        value, buffers, finite = model_loss(ctx, batch.x, batch.y, batch.index)
        if not finite:
            return zero_loss(ctx.model_params, value.device)
        commit_buffers(ctx.net, buffers)  # the model's BatchNorm statistics move once, on a finite batch
        return value


def zero_loss(params: dict[str, nn.Parameter], device: torch.device) -> Tensor:
    """A loss of exactly 0 whose gradient is exactly 0 for every parameter of ``params``."""
    return sum((p.sum() * 0.0 for p in params.values() if p.requires_grad), torch.zeros((), device=device))


def model_step(ctx: StepContext, batch: Batch) -> ModelStep:
    """The model step on its own: :func:`model_loss` and its gradient (averaged over the ranks)."""
    loss, buffers, finite = model_loss(ctx, batch.x, batch.y, batch.index)
    if not finite:
        return ModelStep(zero_loss(ctx.model_params, loss.device).detach(), None, {})
    grads = ctx.scaling.grad(loss, list(ctx.model_params.values()), label="auxlab.gradient.model")
    loss = loss.detach()
    ctx.reducer.average_([loss, *(g for g in grads if g is not None)])
    return ModelStep(loss, dict(zip(ctx.model_params, grads)), buffers)


def apply_model_step(ctx: StepContext, optimizer: torch.optim.Optimizer, model: ModelStep, max_grad_norm: float | None) -> None:
    """Commit the network's buffers, set ``.grad`` of every parameter of the user's optimizer, clip
    the total norm to ``max_grad_norm`` (if given; unscaled first) and step ``optimizer``."""
    assert model.grads is not None
    commit_buffers(ctx.net, model.buffers)
    optimizer.zero_grad(set_to_none=True)
    for name, p in ctx.model_params.items():
        p.grad = ctx.scaling.as_grad(model.grads.get(name))
    if max_grad_norm is not None:
        ctx.scaling.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in ctx.model_params.values() if p.grad is not None], max_grad_norm)
    ctx.scaling.step(optimizer)


def step(ctx: StepContext, batch: Batch, optimizer: torch.optim.Optimizer, learner: MetaLearner | None, max_grad_norm: float | None) -> tuple[Tensor, MetaUpdate | None]:
    """A model step and, with a ``learner`` that is due, its meta step, both at the same theta and phi.

    The learner's :meth:`~auxlab.learners.base.MetaLearner.fused_step` computes both if it can
    share their work; otherwise the meta update is computed first (so that a non-finite one raises
    before anything moved), then the model step. Both are checked before either is applied.

    Returns:
        The model step's loss (detached), and the meta update that was applied (or None).
    """
    with record_function("auxlab.step"):
        fused = learner.fused_step(ctx, batch) if learner is not None else None
        if fused is None:
            update = learner.update(ctx, batch) if learner is not None else None
            model = model_step(ctx, batch)
        else:
            model, update = fused
        if model.grads is not None:
            apply_model_step(ctx, optimizer, model, max_grad_norm)
        if update is not None:
            assert learner is not None
            learner.apply(ctx, update)
        ctx.scaling.update(stepped=model.grads is not None or update is not None)
        return model.loss, update


def meta_step(ctx: StepContext, batch: Batch, learner: MetaLearner) -> MetaUpdate | None:
    """The learner's meta step alone, applied if it was not skipped."""
    with record_function("auxlab.meta_step"):
        update = learner.update(ctx, batch)
        if update is not None:
            learner.apply(ctx, update)
        return update


#: The detached losses a call publishes (``wrapper.last_losses``), by the finite guard's names of the model step's parts.
PUBLISHED_LOSSES = {"primary": "primary loss", "auxiliary": "auxiliary loss"}


def finish(ctx: StepContext, kinds: tuple[str, ...], losses: dict[str, Tensor], update: MetaUpdate | None) -> None:
    """Count a call that completed (one that raised is not counted): in ``ctx.guard.steps``, each step of
    ``kinds`` (``"model"``, ``"meta"``) it did not skip (a skipped one is counted in ``skipped_steps`` only);
    and record in ``losses`` the primary and auxiliary losses of its model step and the objective of its meta
    step, for the steps it took."""
    for kind in kinds:
        if kind not in ctx.guard.skipped_now:
            ctx.guard.steps[kind] += 1
    if "model" in kinds and "model" not in ctx.guard.skipped_now:
        model = ctx.guard.parts.get("model", {})
        losses.update({key: model[name] for key, name in PUBLISHED_LOSSES.items() if name in model})
    if update is not None:
        losses["meta"] = update.objective
