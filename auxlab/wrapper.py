"""MetaAuxWrapper: adds MAXL auxiliary learning (or a baseline strategy) to a user's classifier."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from auxlab import _build, steps
from auxlab._checks import check_batch, check_integer, check_number
from auxlab._seeding import seeded
from auxlab.context import Batch, FiniteGuard, StepContext, strategy_name
from auxlab.distributed import LocalReducer
from auxlab.generators import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.base import MetaLearner, OptimizerFactory
from auxlab.multitask import MultiTaskNet, call_on_buffer_copies, commit_buffers, find_head
from auxlab.scaling import GradScaling, LossScaling
from auxlab.weighting import AuxWeighting, build_weighting

__all__ = ["MetaAuxWrapper"]

SINGLE_TASK = _build.SINGLE_TASK
_STATE_FORMAT = 2


class MetaAuxWrapper(nn.Module):
    """Wraps a classifier to train it with auxiliary labels: MAXL, or a baseline strategy.

    The wrapper adds an auxiliary head of ``K = sum(psi)`` outputs that reads the input of the
    model's primary head (its final ``nn.Linear``), and a label generator that gives each sample a
    soft auxiliary target inside its class's block. ``model`` is trained in place: after training it
    alone is the trained classifier, usable without auxlab. What learns in the meta step (the
    generator's labels, or a meta-learned weighting) is the strategy's :attr:`meta_learner`
    (:mod:`auxlab.learners`); the wrapper builds, checks and delegates.

    Example::

        wrapper = MetaAuxWrapper(model, num_classes=10, psi=5)
        opt = torch.optim.SGD(wrapper.parameters(), lr=0.01)
        for x, y in loader:
            wrapper.step(x, y, opt)        # or: loss = wrapper.loss(x, y); backward; opt.step(); wrapper.meta_step(x, y)
        logits = wrapper(x)

    Args:
        model: any ``nn.Module`` mapping ``x`` to ``(B, C)`` logits through a final ``nn.Linear``.
        num_classes: C, the number of primary classes.
        psi: sub-classes per primary class: one int for all classes, or one per class. Default 5
            (the paper's value). Give ``psi`` or ``mask``, not both.
        mask: the hierarchy, instead of ``psi``.
        generator: a strategy name (``"maxl"``, ``"maxl-light"``, ``"random"``, ``"kmeans"``,
            ``"human"``, ``"rl"``, ``"sla"``, or any registered in
            :data:`auxlab.generators.GENERATORS`), ``"single"`` for single-task training with no
            auxiliary head, or an :class:`~auxlab.AuxLabelGenerator` instance.
        generator_kwargs: keyword arguments for building a strategy given by name, e.g.
            ``{"num_samples": len(train_set)}`` for ``"random"`` or ``{"dataset": train_set}`` for ``"kmeans"``.
        generator_optimizer: ``params -> torch.optim.Optimizer`` for the generator's parameters;
            default: its learner's (SGD(lr=1e-3, weight_decay=5e-4) for MAXL, as in the original code).
        weighting: how much the auxiliary loss counts in each model step (:mod:`auxlab.weighting`):
            ``"constant"`` (default: ``aux_weight``), ``"gcs"``, ``"uncertainty"``, ``"maoal"``
            (learned by :meth:`meta_step` on ``(x_meta, y_meta)``), or an
            :class:`~auxlab.weighting.AuxWeighting` instance. A rule other than the constant one
            needs a strategy whose labels do not learn.
        weighting_kwargs: keyword arguments for building a weighting given by name, e.g.
            ``{"mode": "scale"}`` for ``"gcs"`` or ``{"modules": ["features.0"]}`` for ``"maoal"``.
        weighting_optimizer: ``params -> torch.optim.Optimizer`` for a meta-learned weighting's
            parameters; default Adam(lr=1e-3).
        head: name of the model's primary ``nn.Linear`` (as in ``model.named_modules()``). By
            default the final ``nn.Linear`` if it has ``num_classes`` outputs, else the only one that has.
        inner_lr: alpha, the learning rate of the meta step's virtual SGD step (paper: 0.01).
        aux_weight: weight of the auxiliary loss in the model's loss (paper: 1.0).
        entropy_weight: weight of the generator's entropy regulariser (paper: 0.2).
        focal_gamma: 0 for cross entropy on both heads; the paper's focal loss is 2.
        engine: hypergradient engine (:mod:`auxlab.engines`), fixed at construction: ``"jvp"``
            (default; exact, one forward-mode Jacobian-vector product, no second-order graph: the
            fastest exact engine and the one with the least memory on CPU), ``"functional"`` (exact,
            torch.func with a second-order graph; for a model with an op that has no forward-mode
            derivative), ``"higher"`` (exact, the higher library), or ``"finite_difference"``
            (first order, DARTS-style central difference).
        meta_every: take the meta step on every ``meta_every``-th call of :meth:`meta_step` or
            :meth:`step` only (the others skip it at no cost); 1 is the paper's algorithm.
        virtual_params: restrict the virtual step to these parameters, given as names or name
            prefixes of ``wrapper.named_parameters()`` (e.g. ``["aux_head", "model.fc"]``); the
            others are held fixed in it. None (default): every trainable parameter, as in the paper.
        nonfinite: what a NaN or infinite loss or hypergradient does. ``"raise"`` (default): a
            ``FloatingPointError`` naming the step and the loss, before anything is updated.
            ``"skip"``: a warning, a count in :attr:`skipped_steps`, and the batch contributes
            nothing: :meth:`loss` returns a zero loss whose gradients are exactly zero (plain SGD
            then leaves the parameters as they were; momentum and weight decay of your optimizer
            still act), and :meth:`meta_step` updates nothing.
        seed: seeds the auxiliary head's initialisation and, by default, strategies that draw
            random numbers; the caller's random state is left unchanged.
        distributed: data-parallel training across processes (``torch.distributed``, initialised
            before): ``True`` for the default process group, or a process group. Every rank starts
            from rank 0's parameters, buffers and label tables; :meth:`step` averages the model
            step's gradient and computes the hypergradient of the mean meta objective over the
            ranks' batches, so all ranks stay identical and equal one process on the concatenated
            batch (equal per-rank batch sizes; see :mod:`auxlab.distributed`). Needs
            ``engine="jvp"`` or ``"finite_difference"``. Train with :meth:`step`: a
            ``loss().backward()`` of your own is not averaged.

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
    weighting: AuxWeighting
    num_classes: int
    head_name: str
    steps: dict[str, int]
    skipped_steps: dict[str, int]
    _net: MultiTaskNet
    _reducer: LocalReducer
    _learner: MetaLearner | None
    _meta_every: int
    _virtual_params: frozenset[str] | None

    def __init__(
        self, model: nn.Module, *, num_classes: int, psi: int | Sequence[int] | None = None, mask: HierarchyMask | None = None,
        generator: str | AuxLabelGenerator = "maxl", generator_kwargs: Mapping[str, Any] | None = None,
        generator_optimizer: OptimizerFactory | None = None, weighting: str | AuxWeighting = "constant",
        weighting_kwargs: Mapping[str, Any] | None = None, weighting_optimizer: OptimizerFactory | None = None,
        head: str | None = None, inner_lr: float = 0.01, aux_weight: float = 1.0, entropy_weight: float = 0.2,
        focal_gamma: float = 0.0, engine: str = "jvp", meta_every: int = 1, virtual_params: Sequence[str] | None = None,
        nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0, distributed: bool | dist.ProcessGroup = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.num_classes = check_integer(num_classes, "num_classes", minimum=1)
        self.mask = _build.build_mask(psi, mask, self.num_classes)
        self.inner_lr = check_number(inner_lr, "inner_lr", positive=True)
        self.aux_weight = check_number(aux_weight, "aux_weight")
        self.entropy_weight = check_number(entropy_weight, "entropy_weight")
        self.focal_gamma = check_number(focal_gamma, "focal_gamma")
        self._engine = _build.build_engine(engine, distributed)
        meta_every = check_integer(meta_every, "meta_every", minimum=1)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} is not known; choose 'raise' or 'skip'")
        self.nonfinite: Literal["raise", "skip"] = nonfinite
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.steps, self.skipped_steps = {"model": 0, "meta": 0}, {"model": 0, "meta": 0}
        self.last_meta_objective: Tensor | None = None
        self.head_name = find_head(model, self.num_classes, head)
        device = _build.head_parameter(model, self.head_name).device
        self.model = model
        self.generator = _build.build_generator(generator, generator_kwargs, self.mask, model=model, head_name=self.head_name, seed=seed)
        with seeded(seed, device):
            self.aux_head = None if self.generator is None else _build.new_aux_head(model, self.head_name, self.mask.num_aux_classes)
        if self.generator is not None:
            self.generator = self.generator.to(device=device)
        self.weighting = build_weighting(weighting, weighting_kwargs, model=model, head_name=self.head_name).to(device=device)
        # a view sharing model and aux_head, kept outside the module tree so nothing is registered twice
        object.__setattr__(self, "_net", MultiTaskNet(model, self.head_name, self.aux_head))
        self._virtual_params = _build.select_virtual_params(virtual_params, {n: p for n, p in self._net.named_parameters() if p.requires_grad})
        self._reducer = _build.build_reducer(distributed)
        _build.check_strategy(self.generator, self.weighting, self._reducer)
        self._reducer.broadcast_(self)  # every rank starts from rank 0's networks and label tables
        self._learner = _build.build_learner(
            self.generator, self.weighting, generator_optimizer=generator_optimizer, weighting_optimizer=weighting_optimizer, meta_every=meta_every
        )
        if self._learner is not None:
            self._learner.check(self._context())
        self._meta_every = meta_every

    # ----------------------------------------------------------------------------------- public API
    @property
    def engine(self) -> str:
        """The hypergradient engine's name; fixed at construction (read-only)."""
        return self._engine.name

    @property
    def meta_every(self) -> int:
        """The meta step is taken on every ``meta_every``-th call only; fixed at construction."""
        return self._meta_every

    @property
    def virtual_params(self) -> frozenset[str] | None:
        """The names of the parameters that take the virtual step; None for every trainable one."""
        return self._virtual_params

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
        """The optimizer of a meta-learned weighting's parameters (``weighting="maoal"``), stepped by :meth:`meta_step`; else None."""
        return self._learner.optimizer if self._learner is not None and self._learner.owner is self.weighting else None

    def forward(self, x: Tensor) -> Tensor:
        """The classifier's own primary logits ``(B, C)``: exactly ``model(x)``."""
        return cast(Tensor, self.model(x))

    def aux_targets(self, x: Tensor, y: Tensor, *, index: Tensor | None = None, distribution: bool = False) -> Tensor:
        """The generator's auxiliary targets for a batch, without gradient: ``(B, K)`` probabilities
        (``(M * B, K)``, for the transformed copies of the batch, with a strategy that augments it).

        With ``distribution=True``, the distribution each label is drawn from instead
        (``generator.label_distribution``: the same for every deterministic strategy, a policy's
        probabilities for ``"rl"``, and nothing is drawn). Uses the generator's current mode (train
        or eval) and does not update its running statistics.
        """
        batch = self._batch(x, y, index)
        ctx = self._context()
        x_aux, y_aux = ctx.augmented(batch.x, batch.y)
        with torch.no_grad():
            return ctx.targets(x_aux, cast(Tensor, y_aux), index, distribution=distribution)[0]

    def loss(self, x: Tensor, y: Tensor, *, index: Tensor | None = None) -> Tensor:
        """The model step's loss: ``L_pri + aux_weight * L_aux``, batch means (``L_pri`` alone in single-task mode).

        ``L_aux`` is the auxiliary head's (focal) cross entropy against the generator's targets,
        which are detached: ``loss.backward()`` reaches the classifier and the auxiliary head only.

        Args:
            x: ``(B, ...)`` inputs, on the model's device.
            y: ``(B,)`` integer labels in ``[0, C)``.
            index: ``(B,)`` dataset indices, for strategies with ``needs_index``.

        Raises:
            FloatingPointError: if the loss is not finite and ``nonfinite="raise"``.
        """
        batch = self._batch(x, y, index)
        self._reducer.warn_unaveraged_loss()
        self.steps["model"] += 1
        ctx = self._context()
        loss, buffers, finite = steps.model_loss(ctx, batch.x, batch.y, index)
        if not finite:
            return steps.zero_loss(ctx.model_params, loss.device)
        commit_buffers(self._net, buffers)  # the model's BatchNorm statistics move once, on a finite batch
        return loss

    def aggregated_logits(self, x: Tensor) -> Tensor:
        """SLA's aggregated inference: ``(B, C)`` class scores from the auxiliary (joint) head.

        Runs the network on the strategy's transformed copies of ``x`` and combines the joint
        head's scores of each class over the transformations (``generator.aggregate``). No running
        statistic changes; call ``wrapper.eval()`` first for test-time BatchNorm.

        Raises:
            ValueError: if the strategy does not augment the batch (e.g. ``generator="sla"``).
        """
        if self.generator is None or not self.generator.augments:
            name = SINGLE_TASK if self.generator is None else strategy_name(self.generator)
            raise ValueError(f"aggregated_logits needs a strategy that augments the batch, such as generator='sla'; this wrapper has generator={name!r}")
        (_, aux), _ = call_on_buffer_copies(self._net, self._context().augmented(x, None)[0])
        return self.generator.aggregate(aux)

    def meta_step(self, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *, index: Tensor | None = None) -> Tensor | None:
        """One meta step of the :attr:`meta_learner`: it updates what it learns (MAXL: the label
        generator, by the hypergradient through a virtual step; ``"rl"``: the policy, by REINFORCE;
        ``"maoal"``: the module weights), and nothing else: no classifier parameter, BatchNorm
        statistic, ``.grad`` or state of the user's optimizer changes. With nothing that learns, it
        checks its input and returns None.

        Args:
            x, y: the batch of the virtual step, as in :meth:`loss`.
            x_meta, y_meta: the batch of the meta loss; default ``(x, y)`` (the paper's choice).
            index: ``(B,)`` dataset indices of ``x``, for strategies with ``needs_index``.

        Returns:
            The meta objective's value (detached), or None for a no-op or a skipped step.

        Raises:
            FloatingPointError: if the meta objective or its gradient is not finite and
                ``nonfinite="raise"``; nothing is then changed.
        """
        batch = self._batch(x, y, index, x_meta, y_meta)
        self.last_meta_objective = None
        learner = self._due_learner()
        update = None if learner is None else steps.meta_step(self._context(), batch, learner)
        self.last_meta_objective = None if update is None else update.objective
        return self.last_meta_objective

    def step(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, *, index: Tensor | None = None, x_meta: Tensor | None = None,
        y_meta: Tensor | None = None, max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """A model step and a meta step on one batch, sharing their work where the learner can.

        Equivalent to ``loss = loss(x, y)``, then ``meta_step(x, y, ...)``, then ``zero_grad``,
        ``loss.backward()`` and ``optimizer.step()``: both steps are taken at the same theta and
        phi. With MAXL and ``engine="jvp"`` or ``"finite_difference"`` the two share the
        generator's forward pass and the gradient at theta. ``step`` sets ``.grad`` itself.

        Args:
            x, y, index, x_meta, y_meta: as in :meth:`meta_step`.
            optimizer: the optimizer of ``wrapper.parameters()``, stepped once.
            max_grad_norm: clip the model step's gradient to this total 2-norm (after it was
                averaged over the ranks) before ``optimizer.step()``; None: no clipping.
            scaler: a ``torch.amp.GradScaler``, for float16 autocast: every backward pass runs on
                its loss times the scale and is unscaled again; the optimizers are stepped by
                ``scaler.step`` (a step whose gradient overflowed is skipped, and with an overflow
                at theta the meta step too); ``scaler.update()`` runs once at the end. A learner
                that cannot take one (MAXL with a second-order engine) raises a ValueError.

        Returns:
            The model step's loss, detached.

        Raises:
            FloatingPointError: as :meth:`loss` and :meth:`meta_step`, before anything changes.
        """
        batch = self._batch(x, y, index, x_meta, y_meta)
        if max_grad_norm is not None:
            check_number(max_grad_norm, "max_grad_norm", positive=True)
        ctx = self._context(_build.check_scaler(scaler))
        self.last_meta_objective = None
        learner = self._due_learner()
        self.steps["model"] += 1
        loss, update = steps.step(ctx, batch, optimizer, learner, max_grad_norm)
        self.last_meta_objective = None if update is None else update.objective
        return loss

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the classifier, the auxiliary head and a weighting's own parameters
        (``"uncertainty"``): what the user's optimizer steps. The generator's and a meta-learned
        weighting's are left out (the :attr:`meta_learner` steps them); ``state_dict()`` holds all."""
        dot = f"{prefix}." if prefix else ""
        skip = (f"{dot}generator.", f"{dot}weighting.") if self.weighting.meta_learned else (f"{dot}generator.",)
        for name, p in super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate):
            if not name.startswith(skip):
                yield name, p

    # ----------------------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        """The hierarchy, the meta learner's state and the step counters, saved under ``_extra_state``."""
        learner = None if self._learner is None else self._learner.state_dict()
        return {"format": _STATE_FORMAT, "psi": list(self.mask.psi), "single_task": self.is_single_task, "meta_learner": learner,
                "steps": dict(self.steps), "skipped_steps": dict(self.skipped_steps)}

    def set_extra_state(self, state: Any) -> None:
        learner = self._check_extra_state(state)
        if self._learner is not None and learner is not None:
            self._learner.load_state_dict(learner)
        self.steps.update(state["steps"])
        self.skipped_steps.update(state["skipped_steps"])

    def _check_extra_state(self, state: Any) -> Mapping[str, Any] | None:
        """The checked state's meta-learner part; a ValueError if the state was made for another wrapper."""
        if not isinstance(state, dict) or state.get("format") not in (1, _STATE_FORMAT):
            raise ValueError("the checkpoint was not written by MetaAuxWrapper.state_dict() of this auxlab version")
        if state["psi"] != list(self.mask.psi):
            raise ValueError(f"the checkpoint was made for psi={state['psi']} but this wrapper has psi={list(self.mask.psi)}")
        if state["single_task"] != self.is_single_task:
            kinds = {True: "single-task", False: "auxiliary"}
            raise ValueError(f"the checkpoint was made for {kinds[state['single_task']]} training but this wrapper is {kinds[self.is_single_task]}")
        learner = _build.learner_state(state)
        if (learner is None) != (self._learner is None):
            raise ValueError("the checkpoint's generator learns and this one does not (or the reverse): different strategies")
        return learner

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore classifier, auxiliary head, generator and the meta learner's optimizer from :meth:`state_dict`.

        The whole checkpoint is checked first (hierarchy, strategy, every key and shape), so a
        checkpoint made for another hierarchy or model raises a ValueError and changes nothing.
        """
        if "_extra_state" not in state_dict:
            raise ValueError("state_dict has no '_extra_state' entry: it was not written by MetaAuxWrapper.state_dict()")
        self._check_extra_state(state_dict["_extra_state"])
        _build.check_state_fits(self.state_dict(), state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----------------------------------------------------------------------------------- internals
    def _context(self, scaler: torch.amp.GradScaler | None = None) -> StepContext:
        """What this call runs with: the current settings, and the loss scaling of ``scaler`` (checked against the learner)."""
        device = _build.head_parameter(self.model, self.head_name).device
        ctx = StepContext(
            net=self._net, mask=self.mask, generator=self.generator, weighting=self.weighting, engine=self._engine,
            inner_lr=self.inner_lr, aux_weight=self.aux_weight, entropy_weight=self.entropy_weight, focal_gamma=self.focal_gamma,
            virtual_params=self._virtual_params, model_params=dict(self.named_parameters()), reducer=self._reducer,
            guard=FiniteGuard(self.nonfinite, self.steps, self.skipped_steps, self._reducer),
            scaling=LossScaling() if scaler is None else GradScaling(scaler, device),
        )
        if scaler is not None and self._learner is not None:
            self._learner.check_scaling(ctx)
        return ctx

    def _due_learner(self) -> MetaLearner | None:
        """The meta learner if this call takes a meta step (it counts as one), else None."""
        if self._learner is None:
            return None
        self.steps["meta"] += 1
        return self._learner if self._learner.due(self.steps["meta"]) else None

    def _batch(self, x: Tensor, y: Tensor, index: Tensor | None, x_meta: Tensor | None = None, y_meta: Tensor | None = None) -> Batch:
        """The call's data, checked before anything runs; the meta batch defaults to ``(x, y)``."""
        like = _build.head_parameter(self.model, self.head_name)
        y = check_batch(x, y, "x", "y", num_classes=self.num_classes, like=like)
        if self.generator is not None and self.generator.needs_index and index is None:
            raise ValueError(
                f"the {type(self.generator).__name__} strategy gives a fixed label per training sample and needs index=: "
                "pass the samples' dataset indices (wrap your dataset in auxlab.data.IndexedDataset)"
            )
        if (x_meta is None) != (y_meta is None):
            raise ValueError("give both x_meta and y_meta, or neither (then the meta loss uses x, y)")
        if x_meta is None or y_meta is None:
            return Batch(x, y, index, x, y)
        return Batch(x, y, index, x_meta, check_batch(x_meta, y_meta, "x_meta", "y_meta", num_classes=self.num_classes, like=like))
