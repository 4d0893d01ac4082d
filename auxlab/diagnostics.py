"""Whether a strategy's labels learn: diagnostics for the runner and for a training loop of your own.

- :func:`label_statistics`: how the labels spread over the sub-classes (collapse), how sure they are,
  and how they agree with the true fine labels when those are known (NMI within each class);
- :func:`total_variation`: how far two runs' labels are apart; against the same run with the primary
  hypergradient switched off (its *control*), it says whether the primary task shaped the labels;
- :func:`parameter_movement`: how far the generator moved from where it started;
- :func:`hypergradient_parts`: the norms of the meta objective's primary and regulariser gradients
  and their cosine (MAXL: whether the primary task or the entropy term drives the generator).

Each takes plain tensors or a wrapper and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from auxlab._gradients import global_norm
from auxlab.hierarchy import HierarchyMask
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["hypergradient_parts", "label_statistics", "normalized_mutual_information", "parameter_movement", "total_variation"]


def label_statistics(distribution: Tensor, y: Tensor, mask: HierarchyMask, *, fine_labels: Tensor | None = None) -> dict[str, Any]:
    """How the auxiliary labels of ``N`` samples use the sub-classes, and how sure they are.

    For primary class ``c`` with ``n_c`` samples (an absent class has all of these 0):

    - ``subclass_share[c][j]``: the fraction of its samples whose most likely sub-class is ``j``;
    - ``subclasses_used[c]``: the sub-classes with a share above half of a uniform spread's,
      ``1 / (2 psi[c])`` (``psi[c]`` when all are in use, 1 when collapsed);
    - ``subclass_entropy[c]``: the entropy of ``subclass_share[c]`` in nats, 0 to ``ln psi[c]``;
    - ``target_confidence[c]``: the mean largest probability of its samples' labels, from
      ``1 / psi[c]`` (flat) to 1 (hard);
    - ``subclass_soft_share[c][j]``: the mean probability of sub-class ``j``.

    Over all samples: ``confidence`` (the mean largest probability), ``used_fraction`` (the share of
    the ``K`` sub-classes in use), ``batch_entropy`` (the entropy of the mean label distribution, in
    nats; MAXL's regulariser is minus this) and, with ``fine_labels``, ``fine_nmi``: the normalised
    mutual information of the most likely sub-class with the fine label, within each class, averaged
    over the classes weighted by their samples (1: the sub-classes are the fine classes; about 0:
    unrelated).

    Args:
        distribution: ``(N, K)`` label distributions (``wrapper.aux_targets(x, y, distribution=True)``).
        y: ``(N,)`` primary labels.
        mask: the hierarchy.
        fine_labels: ``(N,)`` the true fine labels, if known.
    """
    if distribution.dim() != 2 or distribution.shape[1] != mask.num_aux_classes or y.shape != distribution.shape[:1]:
        raise ValueError(f"distribution must be (N, {mask.num_aux_classes}) and y (N,), got {tuple(distribution.shape)} and {tuple(y.shape)}")
    if fine_labels is not None and fine_labels.shape != y.shape:
        raise ValueError(f"fine_labels must have shape {tuple(y.shape)} like y, got {tuple(fine_labels.shape)}")
    distribution, y = distribution.detach().double().cpu(), y.cpu()
    columns = distribution.argmax(1)
    stats: dict[str, list[Any]] = {key: [] for key in ("subclass_share", "subclasses_used", "subclass_entropy", "target_confidence", "subclass_soft_share")}
    nmi_sum = 0.0
    for c, size in enumerate(mask.psi):
        block = mask.block(c)
        in_class = y == c
        count = torch.bincount(columns[in_class] - block.start, minlength=size).double()
        share = count / count.sum() if count.sum() > 0 else count
        probabilities = distribution[in_class][:, block.start : block.stop]
        present = probabilities.shape[0] > 0
        stats["subclass_share"].append([float(s) for s in share])
        stats["subclasses_used"].append(int((share > 1.0 / (2 * size)).sum()))
        stats["subclass_entropy"].append(float(-sum(s * math.log(s) for s in share.tolist() if s > 0)))
        stats["target_confidence"].append(float(probabilities.max(1).values.mean()) if present else 0.0)
        stats["subclass_soft_share"].append([float(p) for p in probabilities.mean(0)] if present else [0.0] * size)
        if fine_labels is not None and present:
            nmi_sum += int(in_class.sum()) * normalized_mutual_information(columns[in_class], fine_labels.cpu()[in_class])
    mean = distribution.mean(0)
    overall: dict[str, Any] = {
        "confidence": float(distribution.max(1).values.mean()),
        "used_fraction": sum(stats["subclasses_used"]) / mask.num_aux_classes,
        "batch_entropy": float(-(mean[mean > 0] * mean[mean > 0].log()).sum()),
    }
    if fine_labels is not None:
        overall["fine_nmi"] = nmi_sum / y.shape[0]
    return {**stats, **overall}


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """``2 I(a; b) / (H(a) + H(b))`` of two ``(N,)`` integer labellings (scikit-learn's arithmetic
    normalisation); 1 when either labelling has a single value and the other too, 0 when one of them
    alone has a single value."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be (N,) labellings of the same samples, got {tuple(a.shape)} and {tuple(b.shape)}")
    _, a_index = torch.unique(a, return_inverse=True)
    _, b_index = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(a_index.max()) + 1, int(b_index.max()) + 1, dtype=torch.float64)
    joint.index_put_((a_index, b_index), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    h_a, h_b = float(-(pa * pa.log()).sum()), float(-(pb * pb.log()).sum())
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / (pa[:, None] * pb[None, :])[nonzero]).log()).sum())
    return 2.0 * mutual / (h_a + h_b)


def total_variation(p: Tensor, q: Tensor) -> float:
    """The mean over samples of ``0.5 * sum_k |p_k - q_k|`` of two ``(N, K)`` label distributions:
    0 for the same labels, 1 for disjoint ones."""
    if p.shape != q.shape or p.dim() != 2:
        raise ValueError(f"p and q must be (N, K) distributions of the same samples, got {tuple(p.shape)} and {tuple(q.shape)}")
    return float(0.5 * (p.double() - q.double()).abs().sum(1).mean())


def parameter_movement(module: nn.Module, initial: Mapping[str, Tensor]) -> float:
    """``||phi - phi_0|| / ||phi_0||`` over the trainable parameters of ``module``, with ``initial`` a
    copy of its ``named_parameters()`` taken at the start (e.g. ``{n: p.detach().clone() for ...}``)."""
    now = dict(module.named_parameters())
    missing = sorted(set(initial) - set(now))
    if missing:
        raise ValueError(f"initial names parameters the module does not have: {missing[:5]}")
    moved = global_norm([now[name].detach() - value for name, value in initial.items()])
    start = global_norm(list(initial.values()))
    if moved is None or start is None or float(start) == 0.0:
        return 0.0
    return float(moved / start)


def hypergradient_parts(
    wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None, *, index: Tensor | None = None
) -> dict[str, float]:
    """The gradients of the meta objective's terms for the learner's parameters, apart: the primary
    loss after the virtual step against the regularisers (MAXL: the entropy term times
    ``entropy_weight``; DTG-AuxL: that and its instance term).

    Returns ``{"primary_norm", "<term>_norm" for every other term, "cosine"}``: the norm of each
    term's gradient, and the cosine of the primary gradient with the sum of the others' (MAXL's:
    with the entropy term's; 0 when a norm is 0). Nothing changes: no parameter, statistic, ``.grad``
    or counter.

    Raises:
        ValueError: if nothing learns, or the learner's objective is not a primary term and at least
            one other (:meth:`~auxlab.learners.base.MetaLearner.terms`).
    """
    learner = wrapper.meta_learner
    terms = {} if learner is None else learner.terms(wrapper._context(), wrapper._batch("hypergradient_parts", x, y, index, x_meta, y_meta))
    if learner is None or "primary" not in terms or len(terms) < 2:
        raise ValueError(f"hypergradient_parts needs a learner whose objective is a primary term and a regulariser, as MAXL's; got {type(learner).__name__}")
    grads = {name: torch.autograd.grad(term, learner.params, retain_graph=True, allow_unused=True) for name, term in terms.items()}
    flat = {name: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, learner.params)]) for name, gs in grads.items()}
    norms = {f"{name}_norm": float(torch.linalg.vector_norm(v)) for name, v in flat.items()}
    primary = flat.pop("primary")
    regularisers = torch.stack(list(flat.values())).sum(dim=0)
    scale = norms["primary_norm"] * float(torch.linalg.vector_norm(regularisers))
    return norms | {"cosine": float(primary @ regularisers) / scale if scale > 0 else 0.0}
