"""MAXL: auxiliary labels from a label-generation network trained by meta-learning."""

from __future__ import annotations

import copy
from typing import Any, Literal

from torch import Tensor, nn

from auxlab._checks import check_number
from auxlab._seeding import seeded
from auxlab.generators._features import FeatureReader, check_features, feature_mlp
from auxlab.generators.base import AuxLabelGenerator, check_mask
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.hypergradient import ScaleFreeHypergradientLearner


def label_options(temperature: float, balance_iterations: int) -> tuple[float, int]:
    """``(temperature, balance_iterations)`` of a MAXL generator, checked."""
    if isinstance(balance_iterations, bool) or not isinstance(balance_iterations, int) or balance_iterations < 0:
        raise ValueError(f"balance_iterations must be a non-negative integer (Sinkhorn-Knopp iterations), got {balance_iterations!r}")
    return check_number(temperature, "temperature", positive=True), balance_iterations


def scored_targets(mask: HierarchyMask, scores: Tensor, y: Tensor, *, temperature: float, balance_iterations: int) -> Tensor:
    """``(B, K)`` targets from a generator network's ``(B, K)`` scores: the masked softmax of
    ``scores / temperature`` over each sample's block, balanced over the batch by
    ``balance_iterations`` Sinkhorn-Knopp iterations (:meth:`~auxlab.HierarchyMask.balance`; 0: none)."""
    expected = (y.shape[0], mask.num_aux_classes)
    if scores.shape != expected:
        raise ValueError(f"the generator network must return scores of shape {expected} (B, K=sum(psi)), got {tuple(scores.shape)}")
    probs = mask.softmax(scores / temperature if temperature != 1.0 else scores, y)
    return mask.balance(probs, y, iterations=balance_iterations) if balance_iterations else probs


class MAXLGenerator(AuxLabelGenerator, name="maxl"):
    """Meta-learned auxiliary labels: MAXL (Liu, Davison & Johns, *Self-Supervised Generalisation
    with Meta Auxiliary Learning*, NeurIPS 2019, arXiv:1901.08933).

    A network ``g_phi`` scores the ``K`` auxiliary classes; the targets are the masked softmax of
    those scores over each sample's own block (``mask.softmax``). :class:`~auxlab.MetaAuxWrapper`
    trains ``phi`` in ``meta_step`` so that the labels help the primary task. With the defaults this
    is the paper's generator.

    Args:
        mask: the class-to-sub-class hierarchy.
        network: maps a batch ``x`` to ``(B, K)`` scores. :meth:`from_model` builds the paper's
            default, a re-initialised copy of the classifier with a 2-layer MLP head.
        temperature: divides the scores before the softmax; below 1 sharpens the labels.
        balance_iterations: Sinkhorn-Knopp iterations that spread each class's samples of the batch
            evenly over its sub-classes (:meth:`~auxlab.HierarchyMask.balance`); 0, the paper's
            softmax, leaves them as they are.
    """

    def __init__(self, mask: HierarchyMask, *, network: nn.Module, temperature: float = 1.0, balance_iterations: int = 0) -> None:
        super().__init__(mask)
        self.temperature, self.balance_iterations = label_options(temperature, balance_iterations)
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module mapping x to (B, {mask.num_aux_classes}) scores, got {type(network).__name__}")
        self.network = network

    @classmethod
    def from_model(
        cls, mask: HierarchyMask, model: nn.Module, *, head_name: str, seed: int = 0, init: Literal["default", "xavier_normal"] = "default",
        **options: Any,
    ) -> MAXLGenerator:
        """The paper's generator: a copy of ``model``, re-initialised, whose head becomes an MLP.

        Every submodule with ``reset_parameters`` is re-initialised (seeded by ``seed``; the
        caller's random state is left as it was), and the ``nn.Linear`` named ``head_name`` is
        replaced by ``Linear(d, d) -> ReLU -> Linear(d, K)`` with ``d`` its input width (a model that
        is its own head, ``head_name=""``, becomes that MLP). ``model`` itself is not changed.
        ``init="xavier_normal"`` then draws every weight of a convolution or ``nn.Linear`` by
        ``xavier_normal_`` and sets its bias to 0, as the original MAXL code does (sharper initial
        labels than PyTorch's default). ``options``: the constructor's
        ``temperature`` and ``balance_iterations``.
        """
        check_mask(mask)
        if init not in ("default", "xavier_normal"):
            raise ValueError(f"init={init!r} is not known; choose 'default' (PyTorch's) or 'xavier_normal' (the original MAXL code's)")
        network = copy.deepcopy(model)
        head = network.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head {head_name!r} must be an nn.Linear, got {type(head).__name__}")
        width, device, dtype = head.in_features, head.weight.device, head.weight.dtype
        with seeded(seed, head.weight.device):
            for module in network.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            mlp = nn.Sequential(
                nn.Linear(width, width, device=device, dtype=dtype),
                nn.ReLU(),
                nn.Linear(width, mask.num_aux_classes, device=device, dtype=dtype),
            )
            if head_name:
                network.set_submodule(head_name, mlp)
            else:  # the model is its own head (e.g. a bare nn.Linear): the generator is the MLP on the input
                network = mlp
            if init == "xavier_normal":
                for module in network.modules():
                    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                        nn.init.xavier_normal_(module.weight)
                        if module.bias is not None:
                            nn.init.zeros_(module.bias)
        return cls(mask, network=network, **options)

    @classmethod
    def from_wrapper(
        cls, mask: HierarchyMask, *, model: nn.Module, head_name: str, default_seed: int, **kwargs: Any
    ) -> MAXLGenerator:
        """``generator_kwargs`` may give ``network=``; otherwise the paper's copy of ``model``."""
        if "network" in kwargs:
            return cls(mask, **kwargs)
        return cls.from_model(mask, model, head_name=head_name, **{"seed": default_seed, **kwargs})

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        return scored_targets(self.mask, self.network(x), y, temperature=self.temperature, balance_iterations=self.balance_iterations)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, balance_iterations={self.balance_iterations}"


class LightMAXLGenerator(FeatureReader, name="maxl-light"):
    """MAXL with a light generator: an MLP on the classifier's own features, detached.

    The scores of the ``K`` auxiliary classes are ``mlp(h)``, with ``mlp = Linear(d, hidden) ->
    ReLU -> Linear(hidden, K)`` and ``h`` the ``(B, d)`` input of the classifier's primary head
    (``head_name``), computed without gradient by the classifier itself at its current parameters.
    The targets are ``mask.softmax(mlp(h), y)``. Only the MLP's parameters are ``phi``: the
    classifier is held by reference, outside the module tree, so its parameters are neither in
    :meth:`parameters` nor in :meth:`state_dict` and the generator optimizer never steps them.
    Since ``h`` does not depend on ``phi``, the hypergradient through any exact engine stays exact;
    what the generator saves is the second network: no copy of the classifier to run forward and
    backward.

    ``h`` is what the classifier computes on this batch in its current mode: in training mode,
    BatchNorm normalises with the batch's own statistics, exactly as in the model step's forward
    at theta. The forward runs on copies of the classifier's buffers, so its running statistics
    (and everything else of it) stay as they were; a forward pre-hook on the head captures its
    input and exists only during the call. A classifier with dropout draws its masks from the
    global random state, as the ``"maxl"`` generator's copy of it does.

    Args:
        mask: the class-to-sub-class hierarchy.
        model: the classifier whose features the MLP reads; the wrapper passes the wrapped model.
        head_name: name of the classifier's primary ``nn.Linear`` (its input is ``h``).
        hidden: the MLP's hidden width; default ``d``, the head's input width (as the ``"maxl"``
            generator's MLP head).
        seed: seeds the MLP's initialisation; the caller's random state is left as it was.
        temperature: as for :class:`MAXLGenerator` (default: the paper's softmax).
        balance_iterations: as for :class:`MAXLGenerator` (default: no balancing).
    """

    mlp: nn.Sequential

    def __init__(
        self, mask: HierarchyMask, *, model: nn.Module, head_name: str, hidden: int | None = None, seed: int = 0,
        temperature: float = 1.0, balance_iterations: int = 0,
    ) -> None:
        super().__init__(mask, model=model, head_name=head_name)
        self.temperature, self.balance_iterations = label_options(temperature, balance_iterations)
        self.mlp = feature_mlp(self.head, hidden=hidden, out_features=mask.num_aux_classes, seed=seed)

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """Targets from the classifier's features: ``x`` is the ``(B, d)`` head input (``reads_features``).

        :class:`~auxlab.MetaAuxWrapper` passes the features of its own forward pass; on its own,
        call ``generator(generator.features(x), y)``.
        """
        check_features(x, self.mlp, "the light MAXL generator")
        return scored_targets(self.mask, self.mlp(x), y, temperature=self.temperature, balance_iterations=self.balance_iterations)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, balance_iterations={self.balance_iterations}"


class BalancedMAXLGenerator(MAXLGenerator, name="maxl-balanced"):
    """MAXL whose labels are balanced as a constraint, not by a penalty: the paper's generator network,
    with its targets spread evenly over each class's sub-classes within every batch by Sinkhorn-Knopp
    iterations (:meth:`~auxlab.HierarchyMask.balance`, as SwAV balances its codes) and sharpened by a
    temperature. Collapse onto one sub-class is impossible by construction, so the entropy term has
    nothing left to do (its gradient vanishes once the batch is balanced) and the generator's gradient
    is the primary task's; its learner steps it with Adam by default (the one-step hypergradient is
    proportional to ``inner_lr``, too small for plain SGD at lr 1e-3). Measured in
    benchmarks/results/fashion_mnist/learning_generator.md.

    Args:
        mask: as for :class:`MAXLGenerator`.
        network: as for :class:`MAXLGenerator`.
        temperature: default 0.5.
        balance_iterations: default 3.
    """

    learner = ScaleFreeHypergradientLearner

    def __init__(self, mask: HierarchyMask, *, network: nn.Module, temperature: float = 0.5, balance_iterations: int = 3) -> None:
        super().__init__(mask, network=network, temperature=temperature, balance_iterations=balance_iterations)


class BalancedLightMAXLGenerator(LightMAXLGenerator, name="maxl-light-balanced"):
    """The light generator (an MLP on the classifier's features) with balanced, sharpened targets, as
    :class:`BalancedMAXLGenerator`: temperature 0.5 and 3 Sinkhorn-Knopp iterations by default."""

    learner = ScaleFreeHypergradientLearner

    def __init__(
        self, mask: HierarchyMask, *, model: nn.Module, head_name: str, hidden: int | None = None, seed: int = 0,
        temperature: float = 0.5, balance_iterations: int = 3,
    ) -> None:
        super().__init__(
            mask, model=model, head_name=head_name, hidden=hidden, seed=seed, temperature=temperature, balance_iterations=balance_iterations
        )
