"""MetaAuxWrapper: adds MAXL auxiliary learning (or a baseline strategy) to a user's classifier."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from auxlab._checks import check_number
from auxlab._seeding import seeded
from auxlab.distributed import Reducer
from auxlab.engines import (
    SHARED_DERIVATIVES,
    GradientsAtTheta,
    MetaProblem,
    get_engine,
    gradient_at_theta,
    gradients_at_theta,
    linearised_step,
    meta_loss_after,
    scaled_grad,
    separate_gradients,
)
from auxlab.generators import GENERATORS, AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.losses import classification_loss, model_step_losses, negative_entropy
from auxlab.multitask import MultiTaskNet, find_head
from auxlab.weighting import AuxWeighting, ConstantWeighting, Scale, build_weighting

__all__ = ["MetaAuxWrapper"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

SINGLE_TASK = "single"
_STATE_FORMAT = 1


def default_generator_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The original MAXL code's generator optimizer: SGD, lr 1e-3, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4)


def default_weighting_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of a meta-learned weighting's parameters (``weighting="maoal"``): Adam, lr 1e-3."""
    return torch.optim.Adam(params, lr=1e-3)


class _MetaUpdate(NamedTuple):
    """A meta step's update of the generator (or of a meta-learned weighting), not applied yet."""

    objective: Tensor
    params: list[nn.Parameter]
    grads: tuple[Tensor | None, ...]
    reward: Tensor | None = None  # a policy-gradient strategy's reward, for record_reward


def _combined_gradients(
    primary: Mapping[str, Tensor | None], aux: Mapping[str, Tensor | None], aux_weight: float, scales: Mapping[str, Scale], names: Iterable[str]
) -> dict[str, Tensor | None]:
    """``g_pri + aux_weight * scale * g_aux`` for each parameter of ``names`` (a scale left out is 1);
    None where neither loss reaches the parameter."""
    combined: dict[str, Tensor | None] = {}
    for name in names:
        g_pri, g_aux = primary[name], aux[name]
        if g_aux is None:
            combined[name] = g_pri
            continue
        weighted = g_aux * (aux_weight * scales.get(name, 1.0))
        combined[name] = weighted if g_pri is None else g_pri + weighted
    return combined


def _strategy_name(module: nn.Module) -> str:
    """A strategy's or weighting's registered name, else its class name (for messages)."""
    name = getattr(module, "name", None)
    return name if isinstance(name, str) else type(module).__name__


def _with_gradient(value: Tensor, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``params`` is ``grads`` (and 0 where None)."""
    linear = sum(((p * g).sum() for p, g in zip(params, grads) if g is not None), torch.zeros((), device=value.device, dtype=value.dtype))
    return value.detach() + linear - linear.detach()


def _call_on_buffer_copies(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
    """Run ``module`` on copies of its buffers (BatchNorm statistics); return the output and the
    updated copies, so that the caller commits them only once the step succeeded.

    A module without floating-point buffers (no running statistics; e.g. a fixed label table)
    runs as it is.
    """
    named = dict(module.named_buffers())
    buffers = {name: b.clone() for name, b in named.items()} if any(b.is_floating_point() for b in named.values()) else {}
    if not buffers:
        return module(*args, **kwargs), {}
    return torch.func.functional_call(module, buffers, args, kwargs), buffers


def _commit_buffers(module: nn.Module, updated: Mapping[str, Tensor]) -> None:
    """Copy the buffers updated by :func:`_call_on_buffer_copies` into ``module``."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in updated:
                buffer.copy_(updated[name])


class MetaAuxWrapper(nn.Module):
    """Wraps a classifier to train it with auxiliary labels: MAXL, or a baseline strategy.

    The wrapper adds an auxiliary head of ``K = sum(psi)`` outputs that reads the input of the
    model's primary head (its final ``nn.Linear``), and a label generator that gives each sample a
    soft auxiliary target inside its class's block. ``model`` is trained in place: after training it
    alone is the trained classifier, usable without auxlab.

    Example::

        wrapper = MetaAuxWrapper(model, num_classes=10, psi=5)
        opt = torch.optim.SGD(wrapper.parameters(), lr=0.01)
        for x, y in loader:
            loss = wrapper.loss(x, y)
            opt.zero_grad(); loss.backward(); opt.step()
            wrapper.meta_step(x, y)
        logits = wrapper(x)

    Args:
        model: any ``nn.Module`` mapping ``x`` to ``(B, C)`` logits through a final ``nn.Linear``.
        num_classes: C, the number of primary classes.
        psi: sub-classes per primary class: one int for all classes, or one per class. Default 5
            (the paper's value). Give ``psi`` or ``mask``, not both.
        mask: the hierarchy, instead of ``psi``.
        generator: a strategy name (``"maxl"``, ``"random"``, ``"kmeans"``, ``"human"``, or any
            registered in :data:`auxlab.generators.GENERATORS`), ``"single"`` for single-task
            training with no auxiliary head, or an :class:`~auxlab.AuxLabelGenerator` instance.
        generator_kwargs: keyword arguments for building a strategy given by name, e.g.
            ``{"num_samples": len(train_set)}`` for ``"random"`` or ``{"dataset": train_set}`` for
            ``"kmeans"``.
        generator_optimizer: ``params -> torch.optim.Optimizer`` for the generator's parameters;
            default SGD(lr=1e-3, weight_decay=5e-4) as in the original MAXL code.
        weighting: how much the auxiliary loss counts in each model step (see
            :mod:`auxlab.weighting`): ``"constant"`` (default: ``aux_weight``), ``"gcs"`` (gradient
            cosine similarity), ``"uncertainty"`` (learned task uncertainty), ``"maoal"``
            (meta-learned weight per module, learned by :meth:`meta_step` on ``(x_meta, y_meta)``),
            or an :class:`~auxlab.weighting.AuxWeighting` instance. A rule other than the constant
            one needs a strategy whose labels do not learn (``"human"``, ``"kmeans"``, ``"random"``,
            ``"sla"``, or your own fixed labels).
        weighting_kwargs: keyword arguments for building a weighting given by name, e.g.
            ``{"mode": "scale"}`` for ``"gcs"`` or ``{"modules": ["features.0", "features.3"]}`` for ``"maoal"``.
        weighting_optimizer: ``params -> torch.optim.Optimizer`` for a meta-learned weighting's
            parameters; default Adam(lr=1e-3).
        head: name of the model's primary ``nn.Linear`` (as in ``model.named_modules()``). By
            default the model's final ``nn.Linear`` if it has ``num_classes`` outputs, else the
            only ``nn.Linear`` that has.
        inner_lr: alpha, the learning rate of the meta step's virtual SGD step (paper: 0.01).
        aux_weight: weight of the auxiliary loss in the model's loss (paper: 1.0).
        entropy_weight: weight of the generator's entropy regulariser (paper: 0.2).
        focal_gamma: 0 for cross entropy on both heads; the paper's focal loss is 2.
        engine: hypergradient engine (see :mod:`auxlab.engines`): ``"jvp"`` (default; exact, one
            forward-mode Jacobian-vector product, no second-order graph: the fastest exact engine
            and the one with the least memory on CPU, where it was measured), ``"functional"``
            (exact, torch.func with a second-order graph; for a model with an op that has no
            forward-mode derivative), ``"higher"`` (exact, the higher library), or
            ``"finite_difference"`` (first order, DARTS-style central difference).
        meta_every: do the meta step on every ``meta_every``-th call of :meth:`meta_step` only
            (the others return None at no cost); 1 is the paper's algorithm.
        virtual_params: restrict the virtual step to these parameters, given as names or name
            prefixes of ``wrapper.named_parameters()`` (e.g. ``["aux_head", "model.fc"]``); the
            others are held fixed in it. None (default): every trainable parameter, as in the paper.
        nonfinite: what a NaN or infinite loss or hypergradient does. ``"raise"`` (default): a
            ``FloatingPointError`` naming the step and the loss, before anything is updated.
            ``"skip"``: a warning, a count in :attr:`skipped_steps`, and the batch contributes
            nothing: :meth:`loss` returns a zero loss whose gradients are exactly zero (plain SGD
            then leaves the parameters as they were; momentum and weight decay of your
            optimizer still act), and :meth:`meta_step` updates nothing.
        seed: seeds the auxiliary head's initialisation and, by default, strategies that draw
            random numbers; the caller's random state is left unchanged.
        distributed: data-parallel training across processes (``torch.distributed``, initialised
            before): ``True`` for the default process group, or a process group. Every rank starts
            from rank 0's parameters, buffers and label tables; :meth:`step` averages the model
            step's gradient over the ranks and :meth:`step`/:meth:`meta_step` compute the
            hypergradient of the mean meta objective over the ranks' batches, so all ranks stay
            identical and equal one process on the concatenated batch (equal per-rank batch sizes;
            see :mod:`auxlab.distributed`). Needs ``engine="jvp"`` or ``"finite_difference"``.
            Train with :meth:`step`: a ``loss().backward()`` of your own is not averaged.

    Attributes:
        steps: calls so far of the model step (``loss``/``step``) and the meta step, by ``"model"``/``"meta"``.
        skipped_steps: of those, the steps skipped as non-finite (``nonfinite="skip"``).
        last_meta_objective: the meta objective (detached) of the latest :meth:`step` or
            :meth:`meta_step` call; None when that call took no meta step.
    """

    model: nn.Module
    mask: HierarchyMask
    aux_head: nn.Linear | None
    generator: AuxLabelGenerator | None
    num_classes: int
    head_name: str
    engine: str
    meta_every: int
    _virtual_params: frozenset[str] | None
    nonfinite: Literal["raise", "skip"]
    steps: dict[str, int]
    skipped_steps: dict[str, int]
    last_meta_objective: Tensor | None
    inner_lr: float
    aux_weight: float
    entropy_weight: float
    focal_gamma: float
    _net: MultiTaskNet
    _generator_optimizer: torch.optim.Optimizer | None
    _reducer: Reducer | None
    _warned_loss: bool
    weighting: AuxWeighting
    _weighting_optimizer: torch.optim.Optimizer | None

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        psi: int | Sequence[int] | None = None,
        mask: HierarchyMask | None = None,
        generator: str | AuxLabelGenerator = "maxl",
        generator_kwargs: Mapping[str, Any] | None = None,
        generator_optimizer: OptimizerFactory | None = None,
        weighting: str | AuxWeighting = "constant",
        weighting_kwargs: Mapping[str, Any] | None = None,
        weighting_optimizer: OptimizerFactory | None = None,
        head: str | None = None,
        inner_lr: float = 0.01,
        aux_weight: float = 1.0,
        entropy_weight: float = 0.2,
        focal_gamma: float = 0.0,
        engine: str = "jvp",
        meta_every: int = 1,
        virtual_params: Sequence[str] | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        distributed: bool | dist.ProcessGroup = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.mask = self._build_mask(psi, mask)
        self.inner_lr = check_number(inner_lr, "inner_lr", positive=True)
        self.aux_weight = check_number(aux_weight, "aux_weight")
        self.entropy_weight = check_number(entropy_weight, "entropy_weight")
        self.focal_gamma = check_number(focal_gamma, "focal_gamma")
        get_engine(engine)  # a clear error now rather than at the first meta step
        self.engine = engine
        if distributed is not False and engine not in SHARED_DERIVATIVES:
            raise ValueError(
                f"distributed training needs engine='jvp' (exact) or 'finite_difference', got engine={engine!r}: "
                "only they write the hypergradient from gradients that can be averaged over the ranks"
            )
        if isinstance(meta_every, bool) or not isinstance(meta_every, numbers.Integral) or meta_every < 1:
            raise ValueError(f"meta_every must be a positive integer, got {meta_every!r}")
        self.meta_every = int(meta_every)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} is not known; choose 'raise' or 'skip'")
        self.nonfinite = nonfinite
        self.steps = {"model": 0, "meta": 0}
        self.skipped_steps = {"model": 0, "meta": 0}
        self.last_meta_objective = None
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.head_name = find_head(model, self.num_classes, head)
        linear = model.get_submodule(self.head_name)
        assert isinstance(linear, nn.Linear)

        self.model = model
        single = isinstance(generator, str) and generator == SINGLE_TASK
        if single:
            if generator_kwargs:
                raise ValueError("generator_kwargs has no meaning with generator='single'")
            self.aux_head = None
            self.generator = None
        else:
            built = self._build_generator(generator, generator_kwargs, model, int(seed))
            with seeded(int(seed), linear.weight.device):
                self.aux_head = nn.Linear(
                    linear.in_features, self.mask.num_aux_classes, device=linear.weight.device, dtype=linear.weight.dtype
                )
            self.generator = built.to(device=linear.weight.device)
        # A view sharing model and aux_head, kept outside the module tree so nothing is registered twice.
        object.__setattr__(self, "_net", MultiTaskNet(model, self.head_name, self.aux_head))
        self._virtual_params = self._select_virtual_params(virtual_params)
        self.weighting = build_weighting(weighting, weighting_kwargs, model=model, head_name=self.head_name).to(device=linear.weight.device)
        self._reducer = None if distributed is False else Reducer(None if distributed is True else distributed)
        self._check_combination()
        self._warned_loss = False
        if self._reducer is not None:
            self._reducer.broadcast_(self)  # every rank starts from rank 0's networks and label tables
        learnable = [p for p in self.generator.parameters() if p.requires_grad] if self.generator is not None else []
        self._generator_optimizer = (generator_optimizer or default_generator_optimizer)(learnable) if learnable else None
        weights = [p for p in self.weighting.parameters() if p.requires_grad] if self.weighting.meta_learned else []
        self._weighting_optimizer = (weighting_optimizer or default_weighting_optimizer)(weights) if weights else None

    # ----------------------------------------------------------------------------------- building
    def _check_combination(self) -> None:
        """Refuse combinations of strategy, weighting and distributed training that are not supported."""
        generator, constant = self.generator, isinstance(self.weighting, ConstantWeighting)
        if generator is None:
            if not constant:
                raise ValueError(f"weighting={_strategy_name(self.weighting)!r} needs an auxiliary loss to weight; generator='single' has none")
            return
        name = _strategy_name(generator)
        if not constant and generator.learns:
            raise ValueError(
                f"weighting={_strategy_name(self.weighting)!r} needs labels that do not learn, but generator={name!r} "
                "learns them in the meta step (whose virtual step uses the constant aux_weight); use a fixed strategy such as 'human' or 'kmeans'"
            )
        if not constant and self._reducer is not None:
            raise ValueError("distributed training supports weighting='constant' only")
        if generator.learns and generator.learns_by == "policy_gradient" and self._reducer is not None:
            raise ValueError(f"distributed training does not support generator={name!r}: its policy-gradient reward is not averaged over the ranks")
        if generator.augments and (generator.learns or generator.needs_index):
            raise ValueError(f"generator={name!r} augments the batch, so it can neither learn nor read dataset indices")
        if generator.augments and self.weighting.meta_learned:
            raise ValueError(f"weighting={_strategy_name(self.weighting)!r} does not support a strategy that augments the batch (generator={name!r})")

    def _build_mask(self, psi: int | Sequence[int] | None, mask: HierarchyMask | None) -> HierarchyMask:
        if mask is not None:
            if psi is not None:
                raise ValueError("give psi or mask, not both")
            if not isinstance(mask, HierarchyMask):
                raise TypeError(f"mask must be a HierarchyMask, got {type(mask).__name__}")
            if mask.num_classes != self.num_classes:
                raise ValueError(f"mask has {mask.num_classes} classes (psi={list(mask.psi)}) but num_classes={self.num_classes}")
            return mask
        if psi is None:
            psi = 5
        if isinstance(psi, numbers.Integral) and not isinstance(psi, bool):
            return HierarchyMask.uniform(self.num_classes, int(psi))
        built = HierarchyMask(psi)  # type: ignore[arg-type]
        if built.num_classes != self.num_classes:
            raise ValueError(
                f"psi has {built.num_classes} entries but num_classes={self.num_classes}; "
                "give one sub-class count per class, or a single int for all"
            )
        return built

    def _select_virtual_params(self, prefixes: Sequence[str] | None) -> frozenset[str] | None:
        if prefixes is None:
            return None
        if isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes) or not prefixes:
            raise TypeError(f"virtual_params must be a non-empty list of parameter names or prefixes, got {prefixes!r}")
        names = [name for name, p in self._net.named_parameters() if p.requires_grad]
        chosen = set()
        for prefix in prefixes:
            matched = {n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")}
            if not matched:
                tops = sorted({n.rsplit(".", 1)[0] for n in names})
                raise ValueError(f"virtual_params entry {prefix!r} matches no trainable parameter; modules with parameters: {tops}")
            chosen |= matched
        return frozenset(chosen)

    def _build_generator(
        self, generator: str | AuxLabelGenerator, kwargs: Mapping[str, Any] | None, model: nn.Module, seed: int
    ) -> AuxLabelGenerator:
        if isinstance(generator, AuxLabelGenerator):
            if kwargs:
                raise ValueError("generator_kwargs is only for a generator given by name; configure the instance directly")
            if generator.mask != self.mask:
                raise ValueError(f"the generator's hierarchy psi={list(generator.mask.psi)} differs from the wrapper's psi={list(self.mask.psi)}")
            return generator
        if not isinstance(generator, str):
            raise TypeError(f"generator must be a strategy name or an AuxLabelGenerator, got {type(generator).__name__}")
        if generator not in GENERATORS:
            raise ValueError(f"generator={generator!r} is not known; choose one of {sorted(GENERATORS) + [SINGLE_TASK]} or pass an AuxLabelGenerator")
        strategy = GENERATORS[generator]
        try:
            return strategy.from_wrapper(self.mask, model=model, head_name=self.head_name, default_seed=seed, **dict(kwargs or {}))
        except TypeError as error:
            raise TypeError(f"could not build generator={generator!r} from generator_kwargs={dict(kwargs or {})}: {error}") from error

    # ----------------------------------------------------------------------------------- public API
    @property
    def is_single_task(self) -> bool:
        """True when training without auxiliary head (``generator="single"``)."""
        return self.generator is None

    @property
    def generator_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the generator's parameters, stepped by :meth:`meta_step` (None if it learns nothing)."""
        return self._generator_optimizer

    @property
    def weighting_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of a meta-learned weighting's parameters (``weighting="maoal"``), stepped by :meth:`meta_step`; else None."""
        return self._weighting_optimizer

    def forward(self, x: Tensor) -> Tensor:
        """The classifier's own primary logits ``(B, C)``: exactly ``model(x)``."""
        return cast(Tensor, self.model(x))

    def aux_targets(self, x: Tensor, y: Tensor, *, index: Tensor | None = None) -> Tensor:
        """The generator's auxiliary targets for a batch, without gradient: ``(B, K)`` probabilities
        (``(M * B, K)``, for the transformed copies of the batch, with a strategy that augments it).

        Uses the generator's current mode (train or eval) and does not update its running statistics.
        """
        if self.generator is None:
            raise ValueError("generator='single' trains without auxiliary labels; there are no targets")
        y = self._check_batch(x, y, "x", "y")
        self._check_index_given(index)
        if self.generator.augments:
            x, y = self._augmented(x, y)
        with torch.no_grad():
            return self._targets(x, y, index)[0]

    def loss(self, x: Tensor, y: Tensor, *, index: Tensor | None = None) -> Tensor:
        """The model step's loss: ``L_pri + aux_weight * L_aux``, batch means.

        ``L_aux`` is the auxiliary head's (focal) cross entropy against the generator's targets,
        which are detached: ``loss.backward()`` reaches the classifier and the auxiliary head only.
        In single-task mode it is ``L_pri`` alone.

        Args:
            x: ``(B, ...)`` inputs, on the model's device.
            y: ``(B,)`` integer labels in ``[0, C)``.
            index: ``(B,)`` dataset indices, for strategies with ``needs_index``.

        Returns:
            A scalar tensor to call ``backward()`` on.

        Raises:
            FloatingPointError: if the loss is not finite and ``nonfinite="raise"``.
        """
        y = self._check_batch(x, y, "x", "y")
        self._check_index_given(index)
        if self._reducer is not None and not self._warned_loss:
            self._warned_loss = True
            warnings.warn(
                "with distributed=True, the gradients of loss().backward() are not averaged over the ranks, so the ranks "
                "drift apart; train with wrapper.step(x, y, optimizer), which averages them", RuntimeWarning, stacklevel=2,
            )
        return self._model_loss(x, y, index)[0]

    def _model_loss(self, x: Tensor, y: Tensor, index: Tensor | None, loss_scale: float | None = None) -> tuple[Tensor, bool]:
        """:meth:`loss` after its input checks, and whether the loss was finite. ``loss_scale``: a
        GradScaler's scale, for the two gradients of a gradient-level weighting."""
        self.steps["model"] += 1
        generator = self.generator
        if generator is None:
            (primary, _), statistics = _call_on_buffer_copies(self._net, x, with_aux=False)
            self._check_primary(primary, x)
            loss = classification_loss(primary, y, focal_gamma=self.focal_gamma)
            if not self._finite("model", loss, **{"primary loss": loss}):
                return self._zero_loss(), False
            _commit_buffers(self._net, statistics)
            return loss, True
        x_aux, y_aux = self._augmented(x, y) if generator.augments else (x, y)
        (primary, aux, *features), statistics = _call_on_buffer_copies(self._net, x_aux, with_features=generator.reads_features)
        primary = primary[: x.shape[0]]  # with an augmenting strategy, the rows of the untransformed batch
        self._check_primary(primary, x)
        with torch.no_grad():
            targets = self._targets(x_aux, y_aux, index, features[0] if features else None)[0]
        primary_loss, aux_loss = self._loss_terms(primary, aux, y, targets)
        terms = {"primary loss": primary_loss, "auxiliary loss": aux_loss}
        assert aux is not None
        extra = generator.extra_loss(primary, aux, y)
        if extra is not None:
            terms[f"{_strategy_name(generator)} extra loss"] = extra
            primary_loss = primary_loss + extra  # counted with the primary loss by a gradient-level weighting
        loss = self.weighting.combine(primary_loss, aux_loss, self.aux_weight)
        if not self._finite("model", loss, **terms):
            return self._zero_loss(), False
        if self.weighting.needs_gradients:
            loss = self._weighted_gradient_loss(loss, primary_loss, aux_loss, loss_scale)
        _commit_buffers(self._net, statistics)  # the model's BatchNorm statistics move once, on a finite batch
        return loss, True

    def _weighted_gradient_loss(self, loss: Tensor, primary_loss: Tensor, aux_loss: Tensor, loss_scale: float | None = None) -> Tensor:
        """``loss`` whose gradient is ``g_pri + aux_weight * scale * g_aux``, scaled per parameter by the weighting.

        With ``loss_scale`` the two backward passes run on scaled losses (:func:`~auxlab.engines.scaled_grad`)."""
        params = {name: p for name, p in self._net.named_parameters() if p.requires_grad}
        g_pri, g_aux = separate_gradients(primary_loss, aux_loss, params, loss_scale)
        with torch.no_grad():
            scales = _detached(self.weighting.gradient_scales(g_pri, g_aux))
            grads = _combined_gradients(g_pri, g_aux, self.aux_weight, scales, params)
        return _with_gradient(loss, list(params.values()), [grads[name] for name in params])

    def _augmented(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch of an augmenting strategy's auxiliary task, checked."""
        assert self.generator is not None
        x_aux, y_aux = self.generator.augment(x, y)
        name = _strategy_name(self.generator)
        if y_aux is None or y_aux.shape[0] != x_aux.shape[0] or x_aux.shape[0] % x.shape[0] or not torch.equal(y_aux[: y.shape[0]], y):
            raise ValueError(
                f"generator={name!r} augmented a batch of {x.shape[0]} into {x_aux.shape[0]} inputs and "
                f"{None if y_aux is None else y_aux.shape[0]} labels; expected M * {x.shape[0]} of each, the untransformed batch first"
            )
        return x_aux, y_aux

    def aggregated_logits(self, x: Tensor) -> Tensor:
        """SLA's aggregated inference: ``(B, C)`` class scores from the auxiliary (joint) head.

        Runs the network on the strategy's transformed copies of ``x`` and combines the joint
        head's scores of each class over the transformations (``generator.aggregate``);
        ``softmax`` of the result is the aggregated prediction. No running statistic changes;
        call ``wrapper.eval()`` first for test-time BatchNorm. The plain primary head stays
        available as ``wrapper(x)``.

        Raises:
            ValueError: if the strategy does not augment the batch (e.g. ``generator="sla"``).
        """
        if self.generator is None or not self.generator.augments:
            name = "single" if self.generator is None else _strategy_name(self.generator)
            raise ValueError(f"aggregated_logits needs a strategy that augments the batch, such as generator='sla'; this wrapper has generator={name!r}")
        x_aux, _ = self.generator.augment(x, None)
        (_, aux), _ = _call_on_buffer_copies(self._net, x_aux)
        assert aux is not None
        return self.generator.aggregate(aux)

    def meta_step(
        self, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *, index: Tensor | None = None
    ) -> Tensor | None:
        """One meta step: updates the label generator (MAXL), or what else learns in it, and nothing else.

        Forms the virtual step ``theta' = theta - inner_lr * grad_theta (L_pri + aux_weight * L_aux)``
        on ``(x, y)`` over all trainable parameters of the classifier and auxiliary head, keeping the
        graph, and minimises ``L_pri(f_theta'(x_meta), y_meta) + entropy_weight * sum_k pbar_k log pbar_k``
        over the generator's parameters with the exact second-order hypergradient, stepping the
        generator's optimizer. No classifier parameter, BatchNorm running statistic, ``.grad`` or
        state of the user's optimizer changes.

        The other learners take their own meta step here instead, with the same guarantee:

        - a policy-gradient strategy (``generator="rl"``): REINFORCE on the decrease of the meta
          loss after a virtual step with sampled labels (no second-order gradient);
        - a meta-learned weighting (``weighting="maoal"``): the module weights' exact first-order
          hypergradient through the virtual step (give ``x_meta, y_meta`` from a development split).

        When nothing learns (``"random"``, ``"kmeans"``, ``"human"``, ``"sla"``, single task, with a
        weighting that is not meta-learned) it checks its input and returns None: a no-op.

        Args:
            x, y: the batch of the virtual step, as in :meth:`loss`.
            x_meta, y_meta: the batch of the meta loss; default ``(x, y)`` (the paper's choice).
            index: ``(B,)`` dataset indices of ``x``, for strategies with ``needs_index``.

        Returns:
            The meta objective's value (detached), or None for a no-op or a skipped step
            (``nonfinite="skip"``).

        Raises:
            FloatingPointError: if the meta objective or the hypergradient is not finite and
                ``nonfinite="raise"``; the generator (or weighting) is then left unchanged.
        """
        y, x_meta, y_meta = self._check_meta_inputs(x, y, x_meta, y_meta, index)
        self.last_meta_objective = None
        if not self._meta_due():
            return None
        statistics, update = self._meta_update(x, y, x_meta, y_meta, index)
        if update is None:
            return None
        self._apply_meta_update(statistics, update)
        return update.objective

    def step(
        self,
        x: Tensor,
        y: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        index: Tensor | None = None,
        x_meta: Tensor | None = None,
        y_meta: Tensor | None = None,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """A model step and a meta step on one batch, sharing their work.

        Equivalent to ``loss = loss(x, y)``, then ``meta_step(x, y, ...)``, then ``zero_grad``,
        ``loss.backward()`` and ``optimizer.step()``: both steps are taken at the same theta and
        phi (the model step uses the targets from before the generator's update, the meta step
        the parameters from before the model's update). With ``engine="jvp"`` or ``"finite_difference"`` the two share
        the generator's forward pass and the gradient at theta, which the virtual step needs and
        the model step applies; with the second-order engines they run one after the other.
        ``step`` sets the parameters' ``.grad`` itself (any earlier gradient is replaced).

        Args:
            x, y, index, x_meta, y_meta: as in :meth:`meta_step`.
            optimizer: the optimizer of ``wrapper.parameters()``, stepped once.
            max_grad_norm: clip the model step's gradient to this total 2-norm
                (``torch.nn.utils.clip_grad_norm_`` over ``wrapper.parameters()``, after the
                gradients were averaged over the ranks) before ``optimizer.step()``; None: no
                clipping. The virtual step of the meta step is not clipped.
            scaler: a ``torch.amp.GradScaler``, for float16 autocast: every backward pass of the
                step runs on its loss times the scaler's scale, and the gradient is unscaled again
                (:func:`~auxlab.engines.scaled_grad`); the model's and the meta step's optimizers
                are stepped by ``scaler.step`` (so a step whose gradient overflowed is skipped, and
                with an overflow at theta the meta step too), with ``scaler.unscale_`` before
                clipping; ``scaler.update()`` runs once at the end. A non-finite *loss* still
                follows ``nonfinite``. A generator that learns by hypergradient needs
                ``engine="jvp"`` or ``"finite_difference"`` with a scaler (a ValueError otherwise).

        Returns:
            The model step's loss, detached.

        Raises:
            FloatingPointError: as :meth:`loss` and :meth:`meta_step`, before anything changes.
        """
        y, x_meta, y_meta = self._check_meta_inputs(x, y, x_meta, y_meta, index)
        if max_grad_norm is not None:
            check_number(max_grad_norm, "max_grad_norm", positive=True)
        scaler = self._check_scaler(scaler)
        self.last_meta_objective = None
        due = self._meta_due()
        if due and self._weighting_optimizer is not None:
            return self._step_with_weighting_update(x, y, optimizer, x_meta, y_meta, index, max_grad_norm, scaler)
        if not due or self.engine not in SHARED_DERIVATIVES or not self._learns_by_hypergradient:
            # the meta update is computed first, so that a non-finite one raises before the model's statistics move
            loss_scale = self._loss_scale(scaler)
            statistics, update = self._meta_update(x, y, x_meta, y_meta, index, loss_scale) if due else ({}, None)
            loss, model_finite = self._model_loss(x, y, index, loss_scale)
            if update is not None:
                self._apply_meta_update(statistics, update, scaler, loss_scale)
            if model_finite:
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss if scaler is None else scaler.scale(loss))
                loss = loss.detach()
                if self._reducer is not None:
                    self._reducer.average_([loss, *(p.grad for p in self.parameters() if p.grad is not None)])
                self._optimizer_step(optimizer, max_grad_norm, scaler)
            if scaler is not None and (model_finite or update is not None):
                scaler.update()
            return loss.detach()
        self.steps["model"] += 1
        at_theta = None
        features = None
        if self.generator is not None and self.generator.reads_features:  # the forward at theta serves the targets too
            (primary, aux, features), buffers = _call_on_buffer_copies(self._net, x, with_features=True)
            at_theta = (primary, aux, buffers)
        targets, statistics = self._targets(x, y, index, features)
        loss_scale = self._loss_scale(scaler)
        problem = self._problem(x, y, targets, x_meta, y_meta)
        shared = linearised_step(problem, SHARED_DERIVATIVES[self.engine], at_theta=at_theta, loss_scale=loss_scale)
        self._check_primary(shared.primary, x)
        loss = shared.primary_loss + self.aux_weight * shared.aux_loss
        model_finite = self._finite("model", loss, **{"primary loss": shared.primary_loss, "auxiliary loss": shared.aux_loss})
        # a gradient that overflowed moved theta' off to infinity: the scaler skips both steps
        overflow = loss_scale is not None and not _all_finite(shared.grads.values())
        update = None if overflow else self._hypergradient(shared.surrogate, targets, loss_scale)  # raises before anything changed, if it must
        grads = shared.grads if model_finite else None
        self._apply_steps(optimizer, grads, shared.buffers, max_grad_norm, statistics, update, scaler, loss_scale)
        return loss

    def _step_with_weighting_update(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, x_meta: Tensor, y_meta: Tensor, index: Tensor | None,
        max_grad_norm: float | None, scaler: torch.amp.GradScaler | None,
    ) -> Tensor:
        """:meth:`step` with a meta-learned weighting: one forward pass and the two gradients at theta
        serve the model step (with the weights before their update) and the weights' hypergradient."""
        self.steps["model"] += 1
        loss_scale = self._loss_scale(scaler)
        problem, at_theta = self._weighting_problem(x, y, x_meta, y_meta, index, loss_scale)
        self._check_primary(at_theta.primary, x)
        loss = at_theta.primary_loss + self.aux_weight * at_theta.aux_loss
        model_finite = self._finite("model", loss, **{"primary loss": at_theta.primary_loss, "auxiliary loss": at_theta.aux_loss})
        scales = self.weighting.gradient_scales(at_theta.primary_grads, at_theta.aux_grads)
        # a gradient that overflowed moved theta' off to infinity: the scaler skips both steps
        overflow = loss_scale is not None and not _all_finite([*at_theta.primary_grads.values(), *at_theta.aux_grads.values()])
        update = None if overflow else self._weighting_hypergradient(problem, at_theta, scales, loss_scale)  # raises before anything changed
        grads = (
            _combined_gradients(at_theta.primary_grads, at_theta.aux_grads, self.aux_weight, _detached(scales), at_theta.primary_grads)
            if model_finite else None
        )
        self._apply_steps(optimizer, grads, at_theta.buffers, max_grad_norm, {}, update, scaler, loss_scale)
        return loss

    def _apply_steps(
        self,
        optimizer: torch.optim.Optimizer,
        grads: Mapping[str, Tensor | None] | None,
        buffers: Mapping[str, Tensor],
        max_grad_norm: float | None,
        statistics: Mapping[str, Tensor],
        update: _MetaUpdate | None,
        scaler: torch.amp.GradScaler | None,
        loss_scale: float | None,
    ) -> None:
        """The end of a fused :meth:`step`: the model step from gradients computed by hand (None: a
        non-finite batch, skipped), then the meta update (if any), then ``scaler.update()``."""
        if grads is not None:
            _commit_buffers(self._net, buffers)
            optimizer.zero_grad(set_to_none=True)
            for name, p in self._net.named_parameters():
                if p.requires_grad:
                    p.grad = _as_scaled_grad(grads[name], loss_scale)
            self._optimizer_step(optimizer, max_grad_norm, scaler)
        if update is not None:
            self._apply_meta_update(statistics, update, scaler, loss_scale)
        if scaler is not None and (grads is not None or update is not None):
            scaler.update()

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None, scaler: torch.amp.GradScaler | None = None) -> None:
        """``optimizer.step()`` (``scaler.step(optimizer)``), after clipping the gradients' total norm
        to ``max_grad_norm`` (if given; unscaled first)."""
        if max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)

    def _loss_scale(self, scaler: torch.amp.GradScaler | None) -> float | None:
        """The scaler's scale as a number (``scaler.scale`` also creates it on its first call); None without a scaler."""
        return None if scaler is None else float(scaler.scale(torch.ones((), device=self._device)))

    def _check_scaler(self, scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
        """``scaler`` if it is an enabled GradScaler that this wrapper's steps can use; None if none or disabled."""
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if self._learns_by_hypergradient and self.engine not in SHARED_DERIVATIVES:
            raise ValueError(
                f"scaler= with a generator that learns by hypergradient needs engine='jvp' or 'finite_difference', got "
                f"engine={self.engine!r}: loss scaling through a second-order graph is not implemented"
            )
        return scaler if scaler.is_enabled() else None

    def _check_meta_inputs(
        self, x: Tensor, y: Tensor, x_meta: Tensor | None, y_meta: Tensor | None, index: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Checked ``(y, x_meta, y_meta)``; the meta batch defaults to ``(x, y)``."""
        y = self._check_batch(x, y, "x", "y")
        self._check_index_given(index)
        if (x_meta is None) != (y_meta is None):
            raise ValueError("give both x_meta and y_meta, or neither (then the meta loss uses x, y)")
        if x_meta is None or y_meta is None:
            return y, x, y
        return y, x_meta, self._check_batch(x_meta, y_meta, "x_meta", "y_meta")

    @property
    def _learns_by_hypergradient(self) -> bool:
        """Whether the meta step is MAXL's: the generator's hypergradient through an engine."""
        return self._generator_optimizer is not None and self.generator is not None and self.generator.learns_by == "hypergradient"

    def _meta_due(self) -> bool:
        """Whether this call takes a meta step: something learns in it, and ``meta_every`` says so."""
        if self._generator_optimizer is None and self._weighting_optimizer is None:
            return False
        self.steps["meta"] += 1
        return (self.steps["meta"] - 1) % self.meta_every == 0

    def _meta_update(
        self, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor, index: Tensor | None, loss_scale: float | None = None
    ) -> tuple[dict[str, Tensor], _MetaUpdate | None]:
        """The generator's updated buffers and the meta step's update (not applied yet): the
        generator's through the configured engine or by policy gradient, or a meta-learned weighting's.
        ``loss_scale``: a GradScaler's scale, for the policy gradient's backward passes."""
        if self._weighting_optimizer is not None:
            problem, at_theta = self._weighting_problem(x, y, x_meta, y_meta, index)
            scales = self.weighting.gradient_scales(at_theta.primary_grads, at_theta.aux_grads)
            return {}, self._weighting_hypergradient(problem, at_theta, scales)
        if not self._learns_by_hypergradient:
            return {}, self._policy_gradient(x, y, x_meta, y_meta, index, loss_scale)
        targets, statistics = self._targets(x, y, index)
        meta_primary = get_engine(self.engine)(self._problem(x, y, targets, x_meta, y_meta))
        return statistics, self._hypergradient(meta_primary, targets)

    def _policy_gradient(
        self, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor, index: Tensor | None, loss_scale: float | None = None
    ) -> _MetaUpdate | None:
        """REINFORCE: reward = decrease of the meta batch's primary loss after a virtual step on sampled labels.
        None if skipped: as non-finite, or (with ``loss_scale``) because the virtual step's gradient overflowed."""
        assert self.generator is not None
        targets, log_prob = self.generator.sample(self._generator_input(x), y, index)
        expected = (y.shape[0], self.mask.num_aux_classes)
        if targets.shape != expected or log_prob.shape != expected[:1]:
            raise ValueError(f"generator.sample returned targets {tuple(targets.shape)} and log_prob {tuple(log_prob.shape)}; expected {expected} and {expected[:1]}")
        problem = self._problem(x, y, targets.detach(), x_meta, y_meta)
        gradient = gradient_at_theta(problem, loss_scale)
        if loss_scale is not None and not _all_finite(gradient.values()):
            return None  # an overflow, as in the model step's own gradient: the scaler lowers the scale
        with torch.no_grad():
            before = meta_loss_after(problem, {})
            after = meta_loss_after(problem, {name: g for name in problem.parameters() if (g := gradient[name]) is not None})
        reward = before - after
        objective = self.generator.policy_objective(log_prob, reward)
        terms = {"reward": reward, "policy objective": objective}
        return self._meta_gradient("meta", objective, list(self.generator.parameters()), terms, reward=reward, loss_scale=loss_scale)

    def _weighting_problem(
        self, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor, index: Tensor | None, loss_scale: float | None = None
    ) -> tuple[MetaProblem, GradientsAtTheta]:
        """The meta problem of a meta-learned weighting, and the two losses' gradients at theta."""
        with torch.no_grad():
            targets = self._targets(x, y, index)[0]
        problem = self._problem(x, y, targets, x_meta, y_meta)
        return problem, gradients_at_theta(problem, loss_scale)

    def _weighting_hypergradient(
        self, problem: MetaProblem, at_theta: GradientsAtTheta, scales: Mapping[str, Scale], loss_scale: float | None = None
    ) -> _MetaUpdate | None:
        """A meta-learned weighting's exact hypergradient: ``theta'`` is linear in the weights (``scales``)."""
        direction = _combined_gradients(at_theta.primary_grads, at_theta.aux_grads, self.aux_weight, scales, problem.parameters())
        meta_primary = meta_loss_after(problem, {name: g for name, g in direction.items() if g is not None})
        terms = {"primary loss at theta'": meta_primary}
        return self._meta_gradient("meta", meta_primary, list(self.weighting.parameters()), terms, loss_scale=loss_scale)

    def _meta_gradient(
        self,
        step: str,
        objective: Tensor,
        params: Sequence[nn.Parameter],
        terms: Mapping[str, Tensor],
        *,
        reward: Tensor | None = None,
        loss_scale: float | None = None,
    ) -> _MetaUpdate | None:
        """The gradient of ``objective`` for ``params``, checked finite; None if skipped as non-finite.

        With ``loss_scale`` (a GradScaler's scale) the backward pass runs on the scaled objective
        (:func:`~auxlab.engines.scaled_grad`) and only the objective is checked: a gradient that
        overflowed is the scaler's to skip."""
        learnable = [p for p in params if p.requires_grad]
        grads = scaled_grad(objective, learnable, loss_scale)
        if self._reducer is not None:  # each rank holds the share of its own samples
            self._reducer.sum_([g for g in grads if g is not None])
        if loss_scale is not None:
            checked, parts = objective, dict(terms)
        else:
            present = [g for g in grads if g is not None]
            gradient_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present])) if present else objective.new_zeros(())
            checked, parts = objective + gradient_norm, {**terms, "hypergradient norm": gradient_norm}
        if not self._finite(step, checked, **parts):
            return None
        return _MetaUpdate(objective.detach(), learnable, grads, None if reward is None else reward.detach())

    def _problem(self, x: Tensor, y: Tensor, targets: Tensor, x_meta: Tensor, y_meta: Tensor) -> MetaProblem:
        if self._reducer is not None and self.engine not in SHARED_DERIVATIVES:
            raise ValueError(f"distributed training needs engine='jvp' or 'finite_difference', got engine={self.engine!r}")
        return MetaProblem(
            net=self._net, x=x, y=y, targets=targets, x_meta=x_meta, y_meta=y_meta, inner_lr=self.inner_lr,
            aux_weight=self.aux_weight, focal_gamma=self.focal_gamma, virtual_params=self._virtual_params,
            reducer=self._reducer,
        )

    def _hypergradient(self, meta_primary: Tensor, targets: Tensor, loss_scale: float | None = None) -> _MetaUpdate | None:
        """The generator's gradient of ``meta_primary + entropy_weight * entropy`` (times ``loss_scale``,
        if given); None if skipped as non-finite."""
        assert self.generator is not None
        label_distribution = targets.mean(dim=0)
        if self._reducer is not None:  # the entropy of the labels of every rank's batch together
            label_distribution = self._reducer.mean(label_distribution)
        entropy_term = negative_entropy(label_distribution)
        objective = meta_primary + self.entropy_weight * entropy_term
        terms = {"primary loss at theta'": meta_primary, "entropy term": entropy_term}
        return self._meta_gradient("meta", objective, list(self.generator.parameters()), terms, loss_scale=loss_scale)

    def _apply_meta_update(
        self, statistics: Mapping[str, Tensor], update: _MetaUpdate, scaler: torch.amp.GradScaler | None = None, loss_scale: float | None = None
    ) -> None:
        """Step the generator's optimizer (or a meta-learned weighting's) with ``update`` (by ``scaler.step``,
        if given, with ``loss_scale`` its scale)."""
        if self._weighting_optimizer is not None:
            optimizer = self._weighting_optimizer
        else:
            assert self.generator is not None and self._generator_optimizer is not None
            _commit_buffers(self.generator, statistics)  # the generator's BatchNorm statistics move in its own step
            optimizer = self._generator_optimizer
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(update.params, update.grads):
            p.grad = _as_scaled_grad(g, loss_scale)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
        if self._weighting_optimizer is not None:
            self.weighting.after_meta_step()
        if update.reward is not None:
            assert self.generator is not None
            self.generator.record_reward(update.reward)
        self.last_meta_objective = update.objective

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the classifier, the auxiliary head and a weighting's own parameters
        (``"uncertainty"``): what the user's optimizer steps.

        The generator's parameters are excluded (they are ``wrapper.generator.parameters()``,
        stepped by :meth:`meta_step`), and so are a meta-learned weighting's; ``state_dict()``
        still holds all of them.
        """
        dot = f"{prefix}." if prefix else ""
        skip = (f"{dot}generator.", f"{dot}weighting.") if self.weighting.meta_learned else (f"{dot}generator.",)
        for name, p in super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
            if not name.startswith(skip):
                yield name, p

    # ----------------------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        """The hierarchy, the generator optimizer's state and the step counters, saved under ``_extra_state``."""
        optimizer = self._generator_optimizer
        return {
            "format": _STATE_FORMAT,
            "psi": list(self.mask.psi),
            "single_task": self.is_single_task,
            "generator_optimizer": optimizer.state_dict() if optimizer is not None else None,
            "weighting_optimizer": self._weighting_optimizer.state_dict() if self._weighting_optimizer is not None else None,
            "steps": dict(self.steps),
            "skipped_steps": dict(self.skipped_steps),
        }

    def set_extra_state(self, state: Any) -> None:
        self._check_extra_state(state)
        if self._generator_optimizer is not None and state["generator_optimizer"] is not None:
            self._generator_optimizer.load_state_dict(state["generator_optimizer"])
        if self._weighting_optimizer is not None and state.get("weighting_optimizer") is not None:
            self._weighting_optimizer.load_state_dict(state["weighting_optimizer"])
        self.steps = dict(state["steps"])
        self.skipped_steps = dict(state["skipped_steps"])

    def _check_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("the checkpoint was not written by MetaAuxWrapper.state_dict() of this auxlab version")
        if state["psi"] != list(self.mask.psi):
            raise ValueError(f"the checkpoint was made for psi={state['psi']} but this wrapper has psi={list(self.mask.psi)}")
        if state["single_task"] != self.is_single_task:
            made = "single-task" if state["single_task"] else "auxiliary"
            raise ValueError(f"the checkpoint was made for {made} training but this wrapper is {'single-task' if self.is_single_task else 'auxiliary'}")
        if (state["generator_optimizer"] is None) != (self._generator_optimizer is None):
            raise ValueError("the checkpoint's generator learns and this one does not (or the reverse): different strategies")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore classifier, auxiliary head, generator and generator optimizer from :meth:`state_dict`.

        The whole checkpoint is checked first (hierarchy, strategy, every key and shape), so a
        checkpoint made for another hierarchy or model raises a ValueError and changes nothing.
        """
        own = self.state_dict()
        if "_extra_state" not in state_dict:
            raise ValueError("state_dict has no '_extra_state' entry: it was not written by MetaAuxWrapper.state_dict()")
        self._check_extra_state(state_dict["_extra_state"])
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise ValueError(f"state_dict does not fit this wrapper: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        wrong = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state_dict.items()
            if isinstance(v, Tensor) and k in own and isinstance(own[k], Tensor) and v.shape != own[k].shape
        ]
        if wrong:
            raise ValueError(f"state_dict does not fit this wrapper's shapes: {wrong[:5]}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----------------------------------------------------------------------------------- internals
    def _loss_terms(self, primary: Tensor, aux: Tensor | None, y: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_pri, L_aux)`` of the model step."""
        assert aux is not None
        if aux.shape != targets.shape:
            raise ValueError(f"the auxiliary head gave shape {tuple(aux.shape)} but the targets have {tuple(targets.shape)}; the head's input must be (B, features)")
        return model_step_losses(primary, y, aux, targets, focal_gamma=self.focal_gamma)

    def _finite(self, step: str, total: Tensor, **parts: Tensor) -> bool:
        """Whether ``total`` is finite (on every rank); otherwise raise or (``nonfinite="skip"``) warn and count."""
        finite = bool(torch.isfinite(total))
        if self._reducer is not None:  # all ranks raise or skip together
            finite = self._reducer.all_true(finite, total.device)
        if finite:
            return True
        described = ", ".join(f"{name} = {float(value.detach()):.4g}" for name, value in parts.items())
        if bool(torch.isfinite(total)):
            described += " on this rank, non-finite on another"
        where = f"{step} step {self.steps[step]}"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss at {where}: {described}; nothing was updated. Check the batch for NaN/inf inputs and "
                "the learning rates, or pass nonfinite='skip' to skip such batches"
            )
        self.skipped_steps[step] += 1
        warnings.warn(f"skipped {where}: non-finite loss ({described}); {self.skipped_steps[step]} {step} step(s) skipped so far", RuntimeWarning, stacklevel=3)
        return False

    def _zero_loss(self) -> Tensor:
        """A loss of exactly 0 whose gradient is exactly 0 for every parameter of the user's optimizer."""
        return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self._device))

    def _targets(self, x: Tensor, y: Tensor, index: Tensor | None, features: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's ``(B, K)`` targets, and its updated buffers for :func:`_commit_buffers`.

        A generator that ``reads_features`` gets the classifier's head input: ``features`` when the
        caller's forward pass has it, else from a forward pass here (no gradient, buffer copies).
        """
        assert self.generator is not None
        targets, statistics = _call_on_buffer_copies(self.generator, self._generator_input(x, features), y, index)
        expected = (y.shape[0], self.mask.num_aux_classes)
        if targets.shape != expected:
            raise ValueError(f"the generator returned targets of shape {tuple(targets.shape)}; expected {expected} (B, K=sum(psi))")
        return targets, statistics

    def _generator_input(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """What the generator reads: ``x``, or for a strategy that ``reads_features`` the classifier's
        head input, detached (``features`` when the caller's forward pass has it, else a forward
        pass here without gradient, on buffer copies)."""
        assert self.generator is not None
        if not self.generator.reads_features:
            return x
        if features is None:
            with torch.no_grad():
                features = _call_on_buffer_copies(self._net, x, with_aux=False, with_features=True)[0][2]
        return features.detach()

    @property
    def _device(self) -> torch.device:
        return cast(nn.Linear, self.model.get_submodule(self.head_name)).weight.device

    def _check_batch(self, x: Tensor, y: Tensor, x_name: str, y_name: str) -> Tensor:
        """Validate a batch before anything runs; returns ``y`` as int64."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{x_name} must be a torch.Tensor, got {type(x).__name__}")
        if not isinstance(y, Tensor):
            raise TypeError(f"{y_name} must be a torch.Tensor of class labels, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"{y_name} must be an integer tensor of class labels (e.g. torch.long), got {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"{y_name} must have shape (B,), got {tuple(y.shape)}")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{x_name} has batch size {x.shape[0] if x.dim() else 'none (0-d)'} but {y_name} has {y.shape[0]}; they must match")
        if y.shape[0] == 0:
            raise ValueError(f"{y_name} is an empty batch; give at least one sample")
        dtype = cast(nn.Linear, self.model.get_submodule(self.head_name)).weight.dtype
        if x.is_floating_point() and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{x_name} is {x.dtype} but the model's parameters are {dtype}; convert the batch with {x_name}.to({dtype})")
        device = self._device
        for name, tensor in ((x_name, x), (y_name, y)):
            if tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move the batch with .to({str(device)!r})")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{y_name} has label {bad} but num_classes={self.num_classes}; labels must lie in [0, {self.num_classes})")
        return y.long()

    def _check_index_given(self, index: Tensor | None) -> None:
        if self.generator is not None and self.generator.needs_index and index is None:
            raise ValueError(
                f"the {type(self.generator).__name__} strategy gives a fixed label per training sample and needs index=: "
                "pass the samples' dataset indices (wrap your dataset in auxlab.data.IndexedDataset)"
            )

    def _check_primary(self, primary: Tensor, x: Tensor) -> None:
        expected = (x.shape[0], self.num_classes)
        if primary.shape != expected:
            raise ValueError(f"the model returned shape {tuple(primary.shape)} but (B, num_classes) = {expected} was expected")


def _as_scaled_grad(grad: Tensor | None, loss_scale: float | None) -> Tensor | None:
    """``grad`` as ``.grad`` for a GradScaler's ``step``: times its scale, which the scaler divides out again."""
    return grad if grad is None or loss_scale is None else grad * loss_scale


def _all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (None entries are skipped)."""
    present = [t for t in tensors if t is not None]
    return not present or bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def _detached(scales: Mapping[str, Scale]) -> dict[str, Scale]:
    """``scales`` without their graph (a meta-learned weighting's are differentiable)."""
    return {name: scale.detach() if isinstance(scale, Tensor) else scale for name, scale in scales.items()}
