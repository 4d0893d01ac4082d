"""Hypergradient engines: the meta objective's dependence on the auxiliary targets.

An engine is an :class:`Engine` object, registered by name in :data:`ENGINES`, that declares what it
can do (exact or first order; whether it computes the model step's gradient on the way, so that
:meth:`~auxlab.MetaAuxWrapper.step` can share it; whether it works in data-parallel training and
with a loss scaler). Its :meth:`~Engine.meta_loss` takes a :class:`MetaProblem` and returns a scalar whose value is the primary loss
after the virtual step, ``L_pri(f_theta'(x_meta), y_meta)`` with
``theta' = theta - inner_lr * grad_theta [L_pri + aux_weight * L_aux](theta, t)``, and whose
gradient with respect to the targets ``t`` is that loss's gradient (exactly, or approximately for
``"finite_difference"``). The wrapper adds the entropy term and backpropagates into the generator.
No engine changes a parameter, a buffer (BatchNorm statistics) or ``.grad`` of the network.

- ``"functional"``: exact; ``torch.func.functional_call`` and ``autograd.grad(create_graph=True)``.
- ``"higher"``: exact; the ``higher`` library's differentiable SGD.
- ``"jvp"``: exact without a second-order graph. The auxiliary loss is linear in the targets,
  ``L_aux = sum_bk t_bk c_bk(theta)`` (:func:`~auxlab.losses.soft_target_coefficients`), so
  ``dL_pri(theta')/dt_bk = -inner_lr * aux_weight * (J_c(theta) u)_bk`` with
  ``u = grad L_pri(theta')``: one forward-mode Jacobian-vector product.
- ``"finite_difference"``: the same identity with ``J_c u`` replaced by the central difference
  ``(c(theta + eps u) - c(theta - eps u)) / (2 eps)``, ``eps = 0.01 / ||u||`` (as in DARTS):
  two extra forward passes, first order only, error O(eps^2).
- ``"implicit"``: the implicit-function hypergradient, ``inner_lr * u`` replaced by a truncated Neumann
  series for ``H^-1 u`` (:class:`ImplicitEngine`): a horizon longer than one virtual step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.profiler import record_function

from auxlab._checks import check_integer, check_number
from auxlab._gradients import attach_gradient, global_norm, named_dot
from auxlab.distributed import LocalReducer
from auxlab.losses import classification_loss, model_step_losses, soft_target_coefficients
from auxlab.multitask import MultiTaskNet, buffer_copies
from auxlab.scaling import LossScaling

__all__ = [
    "ENGINES", "FINITE_DIFFERENCE_SCALE", "Engine", "FirstOrderPass", "GradientField", "GradientsAtTheta", "ImplicitEngine", "LinearisedEngine", "MetaProblem", "SharedStep",
    "conjugate_gradient_direction", "first_order_pass", "get_engine", "gradient_at_theta", "gradients_at_theta", "hessian_operator",
    "linearised_step", "loss_terms_at", "meta_gradient", "meta_loss_after", "neumann_direction", "one_step", "separate_gradients", "training_gradient", "virtual_step",
]

#: ``eps * ||u||`` of the finite-difference engine (DARTS's choice).
FINITE_DIFFERENCE_SCALE = 0.01


@dataclass(frozen=True)
class MetaProblem:
    """One meta step's inputs.

    Attributes:
        net: the multi-task network (classifier + auxiliary head).
        x, y: ``(B, ...)`` inputs and ``(B,)`` labels of the virtual step.
        targets: ``(B, K)`` auxiliary targets, differentiable with respect to the generator.
        x_meta, y_meta: the batch of the meta loss.
        inner_lr, aux_weight, focal_gamma: the wrapper's hyper-parameters.
        virtual_params: names of the parameters that take the virtual step; None for every
            trainable parameter. The others are held fixed.
        reducer: the ranks' collective operations: in data-parallel training the gradients at
            theta and at theta' are averaged over the ranks (:mod:`auxlab.distributed`); only
            engines that declare ``distributed`` use it. Default: one process.
        scaling: the loss scaling of every gradient (:mod:`auxlab.scaling`); only engines that
            declare ``loss_scaling`` use it. Default: none.
    """

    net: MultiTaskNet
    x: Tensor
    y: Tensor
    targets: Tensor
    x_meta: Tensor
    y_meta: Tensor
    inner_lr: float
    aux_weight: float
    focal_gamma: float
    virtual_params: frozenset[str] | None = None
    reducer: LocalReducer = field(default_factory=LocalReducer)
    scaling: LossScaling = field(default_factory=LossScaling)

    def parameters(self) -> dict[str, Tensor]:
        """The parameters of the virtual step, by name."""
        return {
            name: p
            for name, p in self.net.named_parameters()
            if p.requires_grad and (self.virtual_params is None or name in self.virtual_params)
        }

    def buffer_copies(self) -> dict[str, Tensor]:
        """Copies of the network's buffers, so that no forward here moves its running statistics."""
        return buffer_copies(self.net)

    def inner_loss(self, primary: Tensor, aux: Tensor | None, targets: Tensor) -> Tensor:
        """``L_pri + aux_weight * L_aux`` of the virtual step."""
        primary_loss, aux_loss = self.loss_terms(primary, aux, targets)
        return primary_loss + self.aux_weight * aux_loss

    def loss_terms(self, primary: Tensor, aux: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_pri, L_aux)`` on ``(x, y)``, as in the model step."""
        assert aux is not None
        return model_step_losses(primary, self.y, aux, targets, focal_gamma=self.focal_gamma)

    def primary_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return classification_loss(logits, y, focal_gamma=self.focal_gamma)


def virtual_step(params: Mapping[str, Tensor], grads: Sequence[Tensor | None], inner_lr: float) -> dict[str, Tensor]:
    """``theta' = theta - inner_lr * grad``; a parameter without gradient stays as it is."""
    return {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}


class Engine:
    """A hypergradient engine: how the meta loss's gradient with respect to the targets is computed.

    A subclass implements :meth:`meta_loss` and declares what it can do; the wrapper checks the
    declarations when it is built (and at :meth:`~auxlab.MetaAuxWrapper.step` for a loss scaler).
    Calling the engine, ``engine(problem)``, is :meth:`meta_loss`.

    Attributes:
        name: its name in :data:`ENGINES`.
        exact: whether the hypergradient is exact (else a first-order approximation).
        shares_gradient: whether it computes the model step's gradient at theta on the way
            (:meth:`shared_step`), so that a fused :meth:`~auxlab.MetaAuxWrapper.step` does not
            compute it twice.
        distributed: whether it works in data-parallel training (first-order gradients that can be
            averaged over the ranks).
        loss_scaling: whether its gradients can be taken on scaled losses (a ``GradScaler``).
    """

    name: str = ""
    exact: bool = True
    shares_gradient: bool = False
    distributed: bool = False
    loss_scaling: bool = False

    def meta_loss(self, problem: MetaProblem) -> Tensor:
        """``L_pri(f_theta'(x_meta), y_meta)``, differentiable with respect to ``problem.targets``."""
        raise NotImplementedError

    def shared_step(self, problem: MetaProblem, *, at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None) -> SharedStep:
        """For ``shares_gradient`` engines: the model step's gradient and the meta loss together."""
        raise NotImplementedError(f"engine={self.name!r} does not share its work with the model step")

    def __call__(self, problem: MetaProblem) -> Tensor:
        return self.meta_loss(problem)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionalEngine(Engine):
    """Exact second order on ``torch.func.functional_call`` and ``autograd.grad(create_graph=True)``."""

    name = "functional"

    def meta_loss(self, problem: MetaProblem) -> Tensor:
        params, buffers = problem.parameters(), problem.buffer_copies()
        primary, aux = functional_call(problem.net, (params, buffers), (problem.x,))
        inner = problem.inner_loss(primary, aux, problem.targets)
        with record_function("auxlab.gradient.virtual_step"):
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)  # the one second-order graph
        moved = virtual_step(params, grads, problem.inner_lr)
        primary_meta, _ = functional_call(problem.net, (moved, buffers), (problem.x_meta,), {"with_aux": False})
        return problem.primary_loss(primary_meta, problem.y_meta)


class HigherEngine(Engine):
    """Exact second order on the ``higher`` library's differentiable SGD (``innerloop_ctx``)."""

    name = "higher"

    def meta_loss(self, problem: MetaProblem) -> Tensor:
        import higher  # type: ignore[import-untyped]

        optimizer = torch.optim.SGD(list(problem.parameters().values()), lr=problem.inner_lr)
        with higher.innerloop_ctx(problem.net, optimizer, copy_initial_weights=False, track_higher_grads=True) as (fnet, diffopt):
            primary, aux = fnet(problem.x)
            with record_function("auxlab.gradient.virtual_step"):
                diffopt.step(problem.inner_loss(primary, aux, problem.targets))
            primary_meta, _ = fnet(problem.x_meta, with_aux=False)
            loss: Tensor = problem.primary_loss(primary_meta, problem.y_meta)
            return loss


DirectionalDerivative = Callable[[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor], dict[str, Tensor]], Tensor]


def forward_mode(function: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """``J_function(at) direction`` by forward-mode automatic differentiation (exact).

    Uses ``torch.autograd.forward_ad`` dual tensors: on the small CNN on CPU (batch 64) they took
    13-23% less time than ``torch.func.jvp`` for the same product (benchmarks/results/jvp_variants/cpu_small_cnn.md).
    """
    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p, direction[name]) for name, p in at.items()}  # type: ignore[no-untyped-call]
        try:
            primal, tangent = forward_ad.unpack_dual(function(duals))  # type: ignore[no-untyped-call]
        except NotImplementedError as error:
            raise NotImplementedError(
                f"engine='jvp' needs a forward-mode derivative of every operation of the model, and one has none: {error} "
                "Pass engine='functional' (exact, second order) or engine='finite_difference' to MetaAuxWrapper"
            ) from error
        return torch.zeros_like(primal) if tangent is None else cast(Tensor, tangent)


def central_difference(function: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """``J_function(at) direction`` by ``(f(at + eps d) - f(at - eps d)) / (2 eps)``, ``eps = 0.01 / ||d||``."""
    norm = global_norm(direction.values())
    if norm is None or norm == 0:
        return torch.zeros_like(function(at))
    eps = FINITE_DIFFERENCE_SCALE / norm
    plus = function({name: p + eps * direction[name] for name, p in at.items()})
    minus = function({name: p - eps * direction[name] for name, p in at.items()})
    difference: Tensor = (plus - minus) / (2 * eps)
    return difference


@dataclass(frozen=True)
class SharedStep:
    """A model step and a meta step computed together (:func:`linearised_step`).

    Attributes:
        primary: ``(B, C)`` primary logits at theta, detached.
        primary_loss, aux_loss: the model step's loss terms at theta (targets detached).
        grads: gradient of ``primary_loss + aux_weight * aux_loss`` for every trainable parameter
            of the network, by name (None where a parameter is unused): the model step's gradient.
        buffers: the network's buffers after the forward pass at theta (BatchNorm statistics), for
            the caller to commit.
        surrogate: as an engine's result: value ``L_pri(theta')``, gradient with respect to the
            targets that of ``L_pri(theta')``.
    """

    primary: Tensor
    primary_loss: Tensor
    aux_loss: Tensor
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]
    surrogate: Tensor


#: ``(problem, params, u) -> (p, scale)``: the direction ``p`` along which the coefficients are differentiated and the
#: step ``scale`` that multiplies it (:func:`linearised_step`); ``(u, inner_lr)`` for the one-step hypergradient.
Direction = Callable[[MetaProblem, dict[str, Tensor], dict[str, Tensor]], tuple[dict[str, Tensor], float]]


#: ``(problem, leaves) -> G``: the lower level's update direction at the virtual parameters ``leaves`` (by name,
#: requiring grad), with its graph to them, one entry per leaf (None where it does not reach one). Its
#: Jacobian takes the place of the Hessian in the implicit gradient. Default: :func:`training_gradient`.
GradientField = Callable[[MetaProblem, dict[str, Tensor]], Sequence[Tensor | None]]


def training_gradient(problem: MetaProblem, leaves: dict[str, Tensor]) -> Sequence[Tensor | None]:
    """``grad (L_pri + aux_weight * L_aux)`` on ``(x, y)`` at ``leaves`` (the others at theta), the targets held
    fixed, with its graph: the field whose Jacobian is the training loss's Hessian."""
    _, primary_loss, aux_loss, _, _ = loss_terms_at(problem, leaves)
    return torch.autograd.grad(primary_loss + problem.aux_weight * aux_loss, list(leaves.values()), create_graph=True, allow_unused=True)


def one_step(problem: MetaProblem, params: dict[str, Tensor], u: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """The one-step hypergradient's direction: ``u`` itself, scaled by ``inner_lr``."""
    return u, problem.inner_lr


@dataclass(frozen=True)
class FirstOrderPass:
    """The first-order part of a linearised meta step (:func:`first_order_pass`), all detached.

    Attributes:
        primary: ``(B, C)`` primary logits at theta.
        primary_loss, aux_loss: the model step's loss terms at theta (averaged over the ranks).
        grads: gradient of ``primary_loss + aux_weight * aux_loss`` for every trainable parameter, by
            name (None where a parameter is unused): the model step's gradient.
        buffers: the network's buffers after the forward pass at theta, for the caller to commit.
        params: the virtual parameters at theta, by name.
        u: ``grad L_pri(f_theta'(x_meta), y_meta)`` for each virtual parameter, at
            ``theta' = theta - inner_lr * grads``.
        meta_loss: ``L_pri(f_theta'(x_meta), y_meta)``.
    """

    primary: Tensor
    primary_loss: Tensor
    aux_loss: Tensor
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]
    params: dict[str, Tensor]
    u: dict[str, Tensor]
    meta_loss: Tensor


def first_order_pass(problem: MetaProblem, *, at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None) -> FirstOrderPass:
    """The gradient ``g`` at theta (also the model step's), the virtual step, and ``u`` at theta'.

    First-order gradients only, both through ``problem.scaling`` and averaged over ``problem.reducer``'s
    ranks. ``at_theta``: the network's forward pass on ``x`` at theta, if the caller has it
    (``(primary, aux, buffers)``, with the graph to the parameters and the updated buffer copies).
    The targets are held fixed (detached).
    """
    every: dict[str, Tensor] = {name: p for name, p in problem.net.named_parameters() if p.requires_grad}
    virtual = problem.parameters()
    with torch.enable_grad():
        if at_theta is None:
            step_buffers = problem.buffer_copies()
            primary, aux = functional_call(problem.net, (every, step_buffers), (problem.x,))
        else:
            primary, aux, step_buffers = at_theta
        primary_loss, aux_loss = problem.loss_terms(primary, aux, problem.targets.detach())
        gradients = problem.scaling.grad(primary_loss + problem.aux_weight * aux_loss, list(every.values()), label="auxlab.gradient.model")
        primary_loss, aux_loss = primary_loss.detach(), aux_loss.detach()
        # the gradient of the mean loss over every rank's batch
        problem.reducer.average_([primary_loss, aux_loss, *(g for g in gradients if g is not None)])
        grads: dict[str, Tensor | None] = dict(zip(every, gradients))
        params = {name: p.detach() for name, p in virtual.items()}
    meta_loss, u = meta_gradient(problem, virtual_step(params, [grads[name] for name in params], problem.inner_lr))
    # u of the mean meta loss; each rank's targets carry 1/R of the batch
    problem.reducer.average_([meta_loss, *u.values()])
    return FirstOrderPass(primary.detach(), primary_loss, aux_loss, grads, step_buffers, params, u, meta_loss)


def meta_gradient(problem: MetaProblem, moved: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_pri(f_theta'(x_meta), y_meta)`` at the virtual parameters ``moved`` (theta' by name; the others at
    theta) and its gradient ``u`` for each of them (zero where it does not reach one), both detached; the
    gradient through ``problem.scaling``, no buffer of the network moved."""
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_() for name, p in moved.items()}
        primary_meta, _ = functional_call(problem.net, (leaves, problem.buffer_copies()), (problem.x_meta,), {"with_aux": False})
        meta_loss = problem.primary_loss(primary_meta, problem.y_meta)
        u_list = problem.scaling.grad(meta_loss, list(leaves.values()), label="auxlab.gradient.meta_loss")
    return meta_loss.detach(), {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(leaves.items(), u_list)}


def linearised_step(
    problem: MetaProblem,
    derivative: DirectionalDerivative,
    *,
    at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None,
    direction: Direction = one_step,
) -> SharedStep:
    """The hypergradient through the targets from ``-inner_lr * aux_weight * J_c(theta) u``.

    :func:`first_order_pass` (``g`` at theta, which is also the model step's gradient, and ``u`` at
    theta'), then one directional derivative of the auxiliary loss's coefficients ``c(theta)`` along
    ``u``. ``direction`` replaces ``inner_lr * u`` by ``scale * p`` (:func:`neumann_direction`: the
    implicit hypergradient's inverse-Hessian-vector product).

    Nothing returned depends on a loss scale. The directional derivative runs in float32 (outside
    autocast), where ``u`` does not underflow.
    """
    first = first_order_pass(problem, at_theta=at_theta)
    share = 1.0 / problem.reducer.world_size

    def coefficients(at: dict[str, Tensor]) -> Tensor:
        _, aux_at = functional_call(problem.net, (at, problem.buffer_copies()), (problem.x,))
        assert aux_at is not None
        return soft_target_coefficients(aux_at, focal_gamma=problem.focal_gamma)

    # in float32 even under autocast: a difference quotient in half precision is noise (off by more
    # than 100% under bfloat16), and float32 tangents are more precise (docs/performance.md)
    p, scale = direction(problem, first.params, first.u)
    with torch.no_grad(), torch.autocast(problem.x.device.type, enabled=False), record_function("auxlab.directional_derivative"):
        target_gradient = -scale * problem.aux_weight * share * derivative(coefficients, first.params, p)
    return SharedStep(
        primary=first.primary,
        primary_loss=first.primary_loss,
        aux_loss=first.aux_loss,
        grads=first.grads,
        buffers=first.buffers,
        surrogate=attach_gradient(first.meta_loss, [problem.targets], [target_gradient]),
    )


class GradientsAtTheta(NamedTuple):
    """The two losses' gradients on ``(x, y)`` at theta (:func:`gradients_at_theta`), all detached.

    Attributes:
        primary: ``(B, C)`` primary logits.
        primary_loss, aux_loss: ``L_pri`` and ``L_aux``.
        primary_grads, aux_grads: their gradients for every trainable parameter of the network, by
            name (None where a loss does not reach the parameter).
        buffers: the network's buffers after the forward pass (BatchNorm statistics), for the caller
            to commit.
    """

    primary: Tensor
    primary_loss: Tensor
    aux_loss: Tensor
    primary_grads: dict[str, Tensor | None]
    aux_grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]


def loss_terms_at(problem: MetaProblem, leaves: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(primary logits, L_pri, L_aux, parameters, buffers)`` on ``(x, y)`` at theta, or with ``leaves`` (by
    name) in place of those parameters, the targets held fixed, with the graph to every parameter used; the
    forward pass runs on buffer copies, returned updated."""
    every: dict[str, Tensor] = {name: p for name, p in problem.net.named_parameters() if p.requires_grad}
    every.update(leaves or {})
    buffers = problem.buffer_copies()
    primary, aux = functional_call(problem.net, (every, buffers), (problem.x,))
    primary_loss, aux_loss = problem.loss_terms(primary, aux, problem.targets.detach())
    return primary, primary_loss, aux_loss, every, buffers


def gradients_at_theta(problem: MetaProblem) -> GradientsAtTheta:
    """The gradients of ``L_pri`` and of ``L_aux`` on ``(x, y)`` at theta, apart (two backward passes,
    through ``problem.scaling``)."""
    with torch.enable_grad():
        primary, primary_loss, aux_loss, every, buffers = loss_terms_at(problem)
        g_pri, g_aux = separate_gradients(primary_loss, aux_loss, every, problem.scaling)
    return GradientsAtTheta(primary.detach(), primary_loss.detach(), aux_loss.detach(), g_pri, g_aux, buffers)


def separate_gradients(
    primary_loss: Tensor, aux_loss: Tensor, params: Mapping[str, Tensor], scaling: LossScaling
) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
    """``(grad L_pri, grad L_aux)`` for ``params`` by name, apart: two backward passes through one graph
    (None where a loss does not reach a parameter; through ``scaling``). The graph is freed afterwards."""
    values = list(params.values())
    g_pri = scaling.grad(primary_loss, values, label="auxlab.gradient.separate", retain_graph=True)
    g_aux = scaling.grad(aux_loss, values, label="auxlab.gradient.separate")
    return dict(zip(params, g_pri)), dict(zip(params, g_aux))


def gradient_at_theta(problem: MetaProblem) -> dict[str, Tensor | None]:
    """``grad (L_pri + aux_weight * L_aux)`` on ``(x, y)`` at theta by parameter name, in one backward
    pass (through ``problem.scaling``)."""
    with torch.enable_grad():
        _, primary_loss, aux_loss, every, _ = loss_terms_at(problem)
        grads = problem.scaling.grad(primary_loss + problem.aux_weight * aux_loss, list(every.values()), label="auxlab.gradient.model")
    return dict(zip(every, grads))


def meta_loss_after(problem: MetaProblem, step: Mapping[str, Tensor]) -> Tensor:
    """``L_pri(f_theta'(x_meta), y_meta)`` at ``theta' = theta - inner_lr * step``.

    ``step`` gives the update direction of the virtual parameters by name (a parameter it leaves
    out stays at theta; an empty ``step`` gives the meta loss at theta). Differentiable with
    respect to ``step``, not to theta; no buffer of the network changes.
    """
    params = {name: p.detach() for name, p in problem.parameters().items()}
    moved = virtual_step(params, [step.get(name) for name in params], problem.inner_lr)
    primary_meta, _ = functional_call(problem.net, (moved, problem.buffer_copies()), (problem.x_meta,), {"with_aux": False})
    return problem.primary_loss(primary_meta, problem.y_meta)


class LinearisedEngine(Engine):
    """An engine on :func:`linearised_step`: first-order gradients and one directional derivative,
    shared with the model step, averaged over the ranks, and taken on scaled losses with a scaler.

    Args:
        name: its name in :data:`ENGINES`.
        derivative: the directional derivative (:func:`forward_mode`, exact, or
            :func:`central_difference`, first order).
        exact: whether ``derivative`` is exact.
    """

    shares_gradient = True
    distributed = True
    loss_scaling = True

    def __init__(self, name: str, derivative: DirectionalDerivative, *, exact: bool) -> None:
        self.name = name
        self.derivative = derivative
        self.exact = exact

    def direction(
        self, problem: MetaProblem, params: dict[str, Tensor], u: dict[str, Tensor], field: GradientField = training_gradient
    ) -> tuple[dict[str, Tensor], float]:
        """``(p, scale)``: the hypergradient's horizon, ``scale * p`` standing for the parameters' response to the
        targets along ``u``; the one-step hypergradient's ``(u, inner_lr)`` here (:func:`one_step`). ``field``:
        the lower level's update direction, for an engine that looks further than one step."""
        return one_step(problem, params, u)

    def meta_loss(self, problem: MetaProblem) -> Tensor:
        return linearised_step(problem, self.derivative, direction=self.direction).surrogate

    def shared_step(self, problem: MetaProblem, *, at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None) -> SharedStep:
        return linearised_step(problem, self.derivative, at_theta=at_theta, direction=self.direction)


HessianVectorProduct = Callable[[dict[str, Tensor]], dict[str, Tensor]]

def hessian_operator(problem: MetaProblem, params: dict[str, Tensor], field: GradientField = training_gradient) -> HessianVectorProduct:
    """``v -> J^T v``, ``J`` the Jacobian of the lower level's update direction ``field`` over the virtual
    parameters ``params`` at theta (by default the training loss's gradient, whose Jacobian is its Hessian
    ``H = H^T``), the targets held fixed: one forward pass and the field with its graph now, then one
    double backward per product (results detached). Call it with gradients enabled."""
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    grads = field(problem, leaves)

    def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
        dot = named_dot(dict(zip(leaves, grads)), v)
        if not dot.requires_grad:  # no parameter of the virtual step reaches the loss
            return {name: torch.zeros_like(t) for name, t in v.items()}
        hessian_term = torch.autograd.grad(dot, list(leaves.values()), retain_graph=True, allow_unused=True)
        return {name: torch.zeros_like(v[name]) if h is None else h.detach() for name, h in zip(leaves, hessian_term)}

    return product


def neumann_direction(
    problem: MetaProblem, params: dict[str, Tensor], v: dict[str, Tensor], *, terms: int, step: float, field: GradientField = training_gradient
) -> dict[str, Tensor]:
    """``p = sum_{j=0..terms} (I - step * H)^j v``, so that ``step * p`` approximates ``H^-1 v`` (a truncated
    Neumann series), ``H`` the Hessian of ``L_pri + aux_weight * L_aux`` on ``(x, y)`` at theta over the
    virtual parameters, the targets held fixed.

    One forward pass and a gradient with its graph, then one Hessian-vector product (a double backward)
    per term (:func:`hessian_operator`); nothing of the series is kept but the running term and sum, so
    memory does not grow with ``terms``. The series converges when ``step`` is below ``2 / lambda_max(H)``
    and ``H`` is positive definite on ``v``'s span; truncated, it is the usual approximation (AuxiLearn's).
    With another ``field`` (a weighting's reweighted gradient), ``H`` is that field's Jacobian, transposed.
    """
    if terms == 0:
        return v
    with torch.enable_grad(), record_function("auxlab.gradient.neumann"):
        hessian = hessian_operator(problem, params, field)
        term, total = dict(v), dict(v)
        for _ in range(terms):
            product = hessian(term)
            term = {name: term[name] - step * product[name] for name in term}
            total = {name: total[name] + term[name] for name in total}
    return total


def conjugate_gradient_direction(
    problem: MetaProblem, params: dict[str, Tensor], v: dict[str, Tensor], *, iterations: int, start: float, field: GradientField = training_gradient
) -> dict[str, Tensor]:
    """``p ~ H^-1 v`` by ``iterations`` steps of conjugate gradient from ``start * v`` (so that with none it is
    the one-step hypergradient's ``inner_lr * v`` when ``start`` is ``inner_lr``), ``H`` as in
    :func:`neumann_direction`; one Hessian-vector product per step and one for the first residual.

    Truncated as in Newton-CG: it stops early where ``H`` has no positive curvature along the search
    direction (a non-convex training loss), or once the residual is below ``sqrt(eps)`` of ``v``'s norm
    (``eps`` of ``v``'s dtype), where rounding would start to steer it into ``H``'s null space.
    """
    p = {name: start * t for name, t in v.items()}
    if iterations == 0:
        return p
    with torch.enable_grad(), record_function("auxlab.gradient.conjugate_gradient"):
        hessian = hessian_operator(problem, params, field)
        product = hessian(p)
        residual = {name: v[name] - product[name] for name in v}
        search, rr = dict(residual), named_dot(residual, residual)
        tolerance = float(named_dot(v, v)) * torch.finfo(rr.dtype).eps  # squared: ||r|| <= sqrt(eps) * ||v||
        for _ in range(iterations):
            if float(rr) <= tolerance:
                break
            product = hessian(search)
            curvature = named_dot(search, product)
            if float(curvature) <= 0.0:
                break
            alpha = rr / curvature
            p = {name: p[name] + alpha * search[name] for name in p}
            residual = {name: residual[name] - alpha * product[name] for name in residual}
            rr_next = named_dot(residual, residual)
            search = {name: residual[name] + (rr_next / rr) * search[name] for name in search}
            rr = rr_next
    return p


class ImplicitEngine(LinearisedEngine):
    """The implicit-function hypergradient: ``-aux_weight * J_c(theta) H^-1 u``, ``H^-1 u`` by a truncated
    Neumann series (:func:`neumann_direction`) or by conjugate gradient (:func:`conjugate_gradient_direction`)
    instead of MAXL's one-step ``inner_lr * u``.

    By the implicit function theorem, at a minimiser theta* of the training loss the targets move the
    meta loss by ``-(d/dt grad_theta L_train)^T H^-1 grad L_pri,meta``; the one-step hypergradient is
    its first term (``terms=0``, ``step=inner_lr``: exactly the ``"jvp"`` engine's result, with either
    solver), and each further term extends the horizon, without being proportional to ``inner_lr``.
    ``u`` is the meta loss's gradient after the virtual step (as in MAXL); ``H`` is taken at theta. First
    order apart from the Hessian-vector products; shares the model step's gradient like ``"jvp"``; not
    (yet) for data-parallel training or a loss scaler.

    Args:
        terms: Neumann terms after the first, or conjugate-gradient steps (0: the one-step hypergradient).
        step: the Neumann series' step ``alpha`` (``H^-1 ~ alpha * sum_j (I - alpha H)^j``), and conjugate
            gradient's start ``alpha * u``; None: ``inner_lr``.
        solver: ``"neumann"`` (AuxiLearn's; converges for ``step < 2 / lambda_max(H)``) or ``"cg"``
            (conjugate gradient; no step to tune, fewer products for the same error where ``H`` is
            positive definite, stops where it is not).
        derivative: the directional derivative of the coefficients (:func:`forward_mode`).
        name: its name in :data:`ENGINES`.
    """

    distributed = False
    loss_scaling = False

    def __init__(
        self, terms: int = 3, step: float | None = None, *, solver: Literal["neumann", "cg"] = "neumann",
        derivative: DirectionalDerivative = forward_mode, name: str = "implicit",
    ) -> None:
        super().__init__(name, derivative, exact=False)
        self.terms = check_integer(terms, "terms", minimum=0)
        self.step = None if step is None else check_number(step, "step", positive=True)
        if solver not in ("neumann", "cg"):
            raise ValueError(f"solver={solver!r} is not known; choose 'neumann' (a truncated Neumann series) or 'cg' (conjugate gradient)")
        self.solver: Literal["neumann", "cg"] = solver

    def direction(
        self, problem: MetaProblem, params: dict[str, Tensor], u: dict[str, Tensor], field: GradientField = training_gradient
    ) -> tuple[dict[str, Tensor], float]:
        """``(p, scale)`` with ``scale * p ~ H^-1 u``: the truncated Neumann series (``scale`` its step) or
        conjugate gradient (``scale`` 1); ``H`` the Jacobian of ``field`` (by default the training loss's Hessian)."""
        step = problem.inner_lr if self.step is None else float(self.step)
        if self.solver == "cg":
            return conjugate_gradient_direction(problem, params, u, iterations=self.terms, start=step, field=field), 1.0
        return neumann_direction(problem, params, u, terms=self.terms, step=step, field=field), step

    def __repr__(self) -> str:
        return f"ImplicitEngine(terms={self.terms}, step={self.step}, solver={self.solver!r}, name={self.name!r})"


#: Engine name -> engine. ``"jvp"``: exact, one forward-mode Jacobian-vector product (the default);
#: ``"finite_difference"``: two extra forward passes instead, O(eps^2); ``"implicit"``: the implicit-function
#: hypergradient with 3 Neumann terms (:class:`ImplicitEngine`; build one with other terms and pass it as ``engine=``).
ENGINES: dict[str, Engine] = {
    engine.name: engine
    for engine in (
        FunctionalEngine(),
        HigherEngine(),
        LinearisedEngine("jvp", forward_mode, exact=True),
        LinearisedEngine("finite_difference", central_difference, exact=False),
        ImplicitEngine(),
    )
}


def get_engine(name: str | Engine) -> Engine:
    """The engine registered as ``name`` (or ``name`` itself if it is an :class:`Engine`); a ValueError listing the choices otherwise."""
    if isinstance(name, Engine):
        return name
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"engine={name!r} is not known; choose one of {sorted(ENGINES)}")
    return ENGINES[name]
