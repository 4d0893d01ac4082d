"""MetaAuxWrapper: adds MAXL auxiliary learning (or a baseline strategy) to a user's classifier."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from auxlab import _build, steps
from auxlab._checks import check_integer, check_number
from auxlab._seeding import seeded
from auxlab.context import Batch, FiniteGuard, StepContext, strategy_name
from auxlab.distributed import LocalReducer
from auxlab.engines import Engine
from auxlab.generators import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.base import MetaLearner, OptimizerFactory
from auxlab.multitask import MultiTaskNet, call_on_buffer_copies, find_head
from auxlab.scaling import GradScaling, LossScaling
from auxlab.weighting import AuxWeighting

__all__ = ["MetaAuxWrapper"]


class MetaAuxWrapper(nn.Module):
    """Wraps a classifier to train it with auxiliary labels: MAXL, or a baseline strategy.

    Adds an auxiliary head of ``K = sum(psi)`` outputs on the input of the model's primary head (its final
    ``nn.Linear``) and a label strategy that gives each sample a target inside its class's block. ``model`` is
    trained in place: afterwards it alone is the trained classifier. What learns in the meta step is the
    strategy's (or weighting's) :attr:`meta_learner` (:mod:`auxlab.learners`); the wrapper builds, checks and
    delegates (docs/architecture.md).

    Example::

        wrapper = MetaAuxWrapper(model, num_classes=10, psi=5)
        opt = torch.optim.SGD(wrapper.parameters(), lr=0.01)
        for x, y in loader:
            wrapper.step(x, y, opt)  # or: wrapper.loss(x, y).backward(); opt.step(); wrapper.meta_step(x, y)
        logits = wrapper(x)

    Args:
        model: any ``nn.Module`` mapping ``x`` to ``(B, C)`` logits through a final ``nn.Linear``.
        num_classes: C, the number of primary classes.
        psi: sub-classes per class: one int for all, or one per class; default 5 (the paper's).
        mask: the hierarchy, instead of ``psi`` (give one of the two).
        generator: a strategy name of :data:`auxlab.generators.GENERATORS` (``"maxl"``, ``"maxl-light"``,
            ``"random"``, ``"kmeans"``, ``"human"``, ``"rl"``, ``"sla"``, ...), ``"single"`` for single-task
            training (no auxiliary head), or an :class:`~auxlab.AuxLabelGenerator` instance.
        generator_kwargs: keyword arguments of a strategy built by name, e.g. ``{"num_samples": len(train_set)}``
            for ``"random"`` or ``{"dataset": train_set}`` for ``"kmeans"``.
        generator_optimizer: ``params -> Optimizer`` for a learning strategy's parameters; default its learner's
            (MAXL: SGD(lr=1e-3, weight_decay=5e-4), as in the original code).
        weighting: how much the auxiliary loss counts (:mod:`auxlab.weighting`): ``"constant"`` (default:
            ``aux_weight``), ``"gcs"``, ``"uncertainty"``, ``"maoal"`` (meta-learned on ``(x_meta, y_meta)``),
            or an :class:`~auxlab.weighting.AuxWeighting`. A rule but the constant one needs fixed labels.
        weighting_kwargs: keyword arguments of a weighting built by name, e.g. ``{"mode": "scale"}``.
        weighting_optimizer: ``params -> Optimizer`` for a meta-learned weighting; default Adam(lr=1e-3).
        head: name of the primary ``nn.Linear`` (as in ``model.named_modules()``); default the final
            ``nn.Linear`` if it has ``num_classes`` outputs, else the only one that has.
        inner_lr: alpha, the learning rate of the meta step's virtual SGD step (paper: 0.01).
        aux_weight: weight of the auxiliary loss in the model's loss (paper: 1.0).
        entropy_weight: weight of the generator's entropy regulariser (paper: 0.2).
        focal_gamma: 0 for cross entropy on both heads; the paper's focal loss is 2.
        engine: the hypergradient engine (:mod:`auxlab.engines`), fixed at construction: ``"jvp"`` (default; exact, one
            forward-mode product, no second-order graph: the fastest exact engine with the least memory on CPU),
            ``"functional"`` (exact, a second-order graph), ``"higher"`` (exact, the higher library), ``"finite_difference"``
            (first order), ``"implicit"`` (implicit-function hypergradient), or an ``Engine`` (``ImplicitEngine(terms=5)``).
        meta_every: take the meta step on every ``meta_every``-th call only; 1 is the paper's algorithm.
        virtual_params: restrict the virtual step to these names or name prefixes of
            ``wrapper.named_parameters()`` (e.g. ``["aux_head", "model.fc"]``); None: all, as in the paper.
        nonfinite: a NaN or infinite loss or hypergradient: ``"raise"`` (default) a ``FloatingPointError``
            before anything is updated; ``"skip"`` a warning, a count in :attr:`skipped_steps`, and no update
            (:meth:`loss` then returns a zero loss with zero gradients).
        seed: seeds the auxiliary head and, by default, strategies that draw random numbers; the caller's
            random state is left unchanged.
        distributed: data-parallel training (``torch.distributed``, initialised before): ``True`` for the
            default process group, or a group. Ranks start from rank 0's state and :meth:`step` keeps them equal
            to one process on the concatenated batch (equal per-rank batches; :mod:`auxlab.distributed`).
            Needs ``engine="jvp"`` or ``"finite_difference"`` and :meth:`step` (``loss().backward()`` is not averaged).

    Attributes:
        steps: completed calls of the model step (``loss``/``step``) and the meta step, by ``"model"``/``"meta"``;
            a call that raised or was skipped is not counted.
        skipped_steps: the steps skipped as non-finite (``nonfinite="skip"``), by ``"model"``/``"meta"``.
        last_losses: detached ``"primary"``/``"auxiliary"`` losses of the latest model step taken (:meth:`step` returns
            their weighted sum; a plain loop's loss compares with ``"primary"``), ``"meta"``: the latest meta objective.
        last_meta_objective: the meta objective (detached) of the latest :meth:`step` or :meth:`meta_step`;
            None when that call took no meta step.
        virtual_params: the names of the parameters that take the virtual step; None for every trainable one.
    """

    def __init__(
        self, model: nn.Module, *, num_classes: int, psi: int | Sequence[int] | None = None, mask: HierarchyMask | None = None,
        generator: str | AuxLabelGenerator = "maxl", generator_kwargs: Mapping[str, Any] | None = None,
        generator_optimizer: OptimizerFactory | None = None, weighting: str | AuxWeighting = "constant",
        weighting_kwargs: Mapping[str, Any] | None = None, weighting_optimizer: OptimizerFactory | None = None,
        head: str | None = None, inner_lr: float = 0.01, aux_weight: float = 1.0, entropy_weight: float = 0.2,
        focal_gamma: float = 0.0, engine: str | Engine = "jvp", meta_every: int = 1, virtual_params: Sequence[str] | None = None,
        nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0, distributed: bool | dist.ProcessGroup = False,
    ) -> None:
        super().__init__()
        self.num_classes: int = check_integer(num_classes, "num_classes", minimum=1)
        self.mask: HierarchyMask = _build.build_mask(psi, mask, self.num_classes)
        self.inner_lr = check_number(inner_lr, "inner_lr", positive=True)
        self.aux_weight = check_number(aux_weight, "aux_weight")
        self.entropy_weight = check_number(entropy_weight, "entropy_weight")
        self.focal_gamma = check_number(focal_gamma, "focal_gamma")
        self._engine = _build.build_engine(engine, distributed)
        self._meta_every: int = check_integer(meta_every, "meta_every", minimum=1)
        self.nonfinite: Literal["raise", "skip"] = _build.check_nonfinite(nonfinite)
        seed = _build.check_seed(seed)
        self.steps: dict[str, int] = {"model": 0, "meta": 0}
        self.skipped_steps: dict[str, int] = {"model": 0, "meta": 0}
        self.last_losses: dict[str, Tensor] = {}
        self.last_meta_objective: Tensor | None = None
        self.head_name: str = find_head(_build.check_model(model), self.num_classes, head)
        device = _build.head_parameter(model, self.head_name).device
        self.model: nn.Module = model
        self.generator: AuxLabelGenerator | None = _build.build_generator(
            generator, generator_kwargs, self.mask, model=model, head_name=self.head_name, seed=seed, device=device
        )
        with seeded(seed, device):
            self.aux_head: nn.Linear | None = None if self.generator is None else _build.new_aux_head(model, self.head_name, self.mask.num_aux_classes)
        self.weighting: AuxWeighting = _build.build_weighting(weighting, weighting_kwargs, model=model, head_name=self.head_name, device=device)
        self._net: MultiTaskNet  # a view sharing model and aux_head, outside the module tree (nothing registered twice)
        object.__setattr__(self, "_net", MultiTaskNet(model, self.head_name, self.aux_head, _build.aux_input(self.generator)))
        self.virtual_params: frozenset[str] | None = _build.select_virtual_params(virtual_params, {n: p for n, p in self._net.named_parameters() if p.requires_grad})
        self._reducer: LocalReducer = _build.build_reducer(distributed)
        _build.check_strategy(self.generator, self.weighting, self._reducer)
        self._reducer.broadcast_(self)  # every rank starts from rank 0's networks and label tables
        self._learner: MetaLearner | None = _build.build_learner(
            self.generator, self.weighting, generator_optimizer=generator_optimizer, weighting_optimizer=weighting_optimizer, meta_every=self._meta_every
        )
        if self._learner is not None:
            self._learner.check(self._context())

    @property
    def engine(self) -> str:
        """The hypergradient engine's name; fixed at construction (read-only)."""
        return self._engine.name

    @property
    def meta_every(self) -> int:
        """The meta step is taken on every ``meta_every``-th call only; fixed at construction."""
        return self._meta_every

    @property
    def meta_learner(self) -> MetaLearner | None:
        """What learns in the meta step (:mod:`auxlab.learners`), with its optimizer; None if nothing does."""
        return self._learner

    @property
    def is_single_task(self) -> bool:
        """True when training without auxiliary head (``generator="single"``)."""
        return self.generator is None

    @property
    def generator_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the generator's parameters, stepped by :meth:`meta_step` (None if it learns nothing)."""
        return self._learner.optimizer if self._learner is not None and self._learner.owner is self.generator else None

    @property
    def weighting_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of a meta-learned weighting (``"maoal"``), stepped by :meth:`meta_step`; else None."""
        return self._learner.optimizer if self._learner is not None and self._learner.owner is self.weighting else None

    def forward(self, x: Tensor) -> Tensor:
        """The classifier's own primary logits ``(B, C)``: exactly ``model(x)``."""
        return cast(Tensor, self.model(x))

    def aux_targets(self, x: Tensor, y: Tensor, *, index: Tensor | None = None, distribution: bool = False) -> Tensor:
        """The strategy's targets, without gradient: ``(B, K)`` probabilities (``(M * B, K)`` for an augmenting strategy),
        in the generator's current mode, moving no running statistic. ``distribution=True``: the distribution each
        label is drawn from (``generator.label_distribution``; a policy's probabilities for ``"rl"``, drawing nothing)."""
        batch, ctx = self._batch("aux_targets", x, y, index), self._context()
        x_aux, y_aux = ctx.augmented(batch.x, batch.y)
        with torch.no_grad():
            return ctx.targets(x_aux, cast(Tensor, y_aux), index, distribution=distribution)[0]

    def loss(self, x: Tensor, y: Tensor, *, index: Tensor | None = None) -> Tensor:
        """The model step's loss ``L_pri + aux_weight * L_aux`` (batch means; ``L_pri`` alone in single-task mode),
        ``L_aux`` against the strategy's targets, detached: ``loss.backward()`` reaches the classifier and the
        auxiliary head only. ``x``: ``(B, ...)`` inputs on the model's device; ``y``: ``(B,)`` labels in
        ``[0, C)``; ``index``: ``(B,)`` dataset indices, for strategies with ``needs_index``. A
        ``FloatingPointError`` if the loss is not finite and ``nonfinite="raise"``."""
        batch, ctx = self._batch("loss", x, y, index), self._context()
        value = steps.loss(ctx, batch)
        steps.finish(ctx, ("model",), self.last_losses, None)
        return value

    def aggregated_logits(self, x: Tensor) -> Tensor:
        """SLA's aggregated inference: ``(B, C)`` class scores of the joint auxiliary head over the
        strategy's transformed copies of ``x`` (``generator.aggregate``); no running statistic
        moves. A ValueError for a strategy that does not augment the batch (as ``"sla"`` does)."""
        if self.generator is None or not self.generator.augments:
            name = _build.SINGLE_TASK if self.generator is None else strategy_name(self.generator)
            raise ValueError(f"aggregated_logits needs a strategy that augments the batch, such as generator='sla'; this wrapper has generator={name!r}")
        (_, aux), _ = call_on_buffer_copies(self._net, self._context().augmented(x, None)[0])
        return self.generator.aggregate(aux)

    def meta_step(self, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *, index: Tensor | None = None) -> Tensor | None:
        """One meta step of the :attr:`meta_learner` (MAXL: the generator, by the hypergradient through a virtual
        step; ``"rl"``: the policy, by REINFORCE; ``"maoal"``: the module weights); nothing else changes (no
        classifier parameter, BatchNorm statistic, ``.grad`` or optimizer state). ``x, y, index``: the batch
        of the virtual step, as in :meth:`loss`; ``x_meta, y_meta``: the batch of the meta loss (default
        ``(x, y)``, the paper's choice). Returns the meta objective (detached), or None if nothing learns or
        the step was not due or was skipped; a ``FloatingPointError`` if it is not finite (``nonfinite="raise"``)."""
        batch = self._batch("meta_step", x, y, index, x_meta, y_meta)
        ctx, learner = self._context(), self._due_learner()
        update = None if learner is None else steps.meta_step(ctx, batch, learner)
        steps.finish(ctx, self._kinds(model=False), self.last_losses, update)
        self.last_meta_objective = None if update is None else update.objective
        return self.last_meta_objective

    def step(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, *, index: Tensor | None = None, x_meta: Tensor | None = None,
        y_meta: Tensor | None = None, max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """A model step and a meta step on one batch at the same theta and phi, sharing their work where the
        learner can (MAXL with ``"jvp"``/``"finite_difference"``: the generator's forward and the gradient at
        theta); equals ``loss``, ``meta_step``, ``zero_grad``, ``backward``, ``optimizer.step()``. Returns the
        model step's loss, detached; raises as :meth:`loss` and :meth:`meta_step`, before anything changes.

        Args:
            x: ``(B, ...)`` inputs, as in :meth:`loss`.
            y: ``(B,)`` labels in ``[0, C)``, as in :meth:`loss`.
            optimizer: the optimizer of ``wrapper.parameters()``, stepped by the model step.
            index: ``(B,)`` dataset indices, as in :meth:`loss`.
            x_meta: inputs of the meta loss's batch, as in :meth:`meta_step` (default ``x``).
            y_meta: labels of the meta loss's batch, as in :meth:`meta_step` (default ``y``).
            max_grad_norm: clip the model step's gradient (averaged over the ranks) to this total 2-norm.
            scaler: a ``torch.amp.GradScaler`` for float16 autocast: every backward pass runs on the scaled loss,
                the optimizers step through ``scaler.step`` (an overflow at theta skips both steps) and
                ``scaler.update()`` runs once; a ValueError from a learner that cannot take one.
        """
        batch = self._batch("step", x, y, index, x_meta, y_meta)
        if max_grad_norm is not None:
            check_number(max_grad_norm, "max_grad_norm", positive=True)
        ctx, learner = self._context(_build.check_scaler(scaler)), self._due_learner()
        loss, update = steps.step(ctx, batch, optimizer, learner, max_grad_norm)
        steps.finish(ctx, self._kinds(model=True), self.last_losses, update)
        self.last_meta_objective = None if update is None else update.objective
        return loss

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """What the user's optimizer steps: the classifier, the auxiliary head and a weighting's own
        parameters (``"uncertainty"``); not the generator's or a meta-learned weighting's (the
        :attr:`meta_learner` steps them). ``state_dict()`` holds all."""
        dot = f"{prefix}." if prefix else ""
        skip = (f"{dot}generator.", f"{dot}weighting.") if self.weighting.meta_learned else (f"{dot}generator.",)
        for name, p in super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
            if not name.startswith(skip):
                yield name, p

    def get_extra_state(self) -> dict[str, Any]:
        """The hierarchy, the meta learner's state and the step counters, saved under ``_extra_state``."""
        return _build.extra_state(self.mask, self.is_single_task, self._learner, self.steps, self.skipped_steps)

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved, checked against this wrapper: the learner's state, the counters."""
        saved = _build.check_extra_state(state, self.mask, self.is_single_task, self._learner)
        if self._learner is not None and saved is not None:
            self._learner.load_state_dict(saved)
        self.steps.update(state["steps"])
        self.skipped_steps.update(state["skipped_steps"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore everything :meth:`state_dict` holds; the whole checkpoint is checked first (hierarchy, strategy,
        every key and shape): one made for another hierarchy or model raises a ValueError and changes nothing."""
        _build.check_loadable(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _context(self, scaler: torch.amp.GradScaler | None = None) -> StepContext:
        """What this call runs with: the current settings, and ``scaler``'s loss scaling (checked against the learner)."""
        scaling = LossScaling() if scaler is None else GradScaling(scaler, _build.head_parameter(self.model, self.head_name).device)
        ctx = StepContext(
            net=self._net, mask=self.mask, generator=self.generator, weighting=self.weighting, engine=self._engine,
            inner_lr=self.inner_lr, aux_weight=self.aux_weight, entropy_weight=self.entropy_weight, focal_gamma=self.focal_gamma,
            virtual_params=self.virtual_params, model_params=dict(self.named_parameters()), reducer=self._reducer,
            guard=FiniteGuard(self.nonfinite, self.steps, self.skipped_steps, self._reducer), scaling=scaling,
        )
        if scaler is not None and self._learner is not None:
            self._learner.check_scaling(ctx)
        return ctx

    def _due_learner(self) -> MetaLearner | None:
        """The meta learner if this call takes a meta step, else None (the call counts once it completed)."""
        return self._learner if self._learner is not None and self._learner.due(self.steps["meta"] + 1) else None

    def _kinds(self, *, model: bool) -> tuple[str, ...]:
        """The steps a call counts: the model step's (if ``model``), and the meta step's if anything learns."""
        return ("model",) * model + ("meta",) * (self._learner is not None)

    def _batch(self, call: str, x: Tensor, y: Tensor, index: Tensor | None, x_meta: Tensor | None = None, y_meta: Tensor | None = None) -> Batch:
        like, reducer = _build.head_parameter(self.model, self.head_name), self._reducer
        return _build.check_call(call, x, y, index, x_meta, y_meta, num_classes=self.num_classes, like=like, generator=self.generator, reducer=reducer)
