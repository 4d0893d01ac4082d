"""Argument checks shared by the wrapper and the strategies: one wording for every bad number."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_number(value: object, name: str, *, positive: bool = False, signed: bool = False) -> float:
    """``value`` as a float: finite, and ``>= 0`` (``> 0`` with ``positive``; any sign with ``signed``).

    Raises a TypeError (not a finite real number) or ValueError (out of range) naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not signed and (value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def check_integer(value: object, name: str, *, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; a ValueError naming ``name`` otherwise (bools are not integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_batch(x: object, y: object, x_name: str, y_name: str, *, num_classes: int, like: Tensor) -> Tensor:
    """Validate a batch before anything runs: tensors, matching batch sizes, labels in
    ``[0, num_classes)``, and ``like``'s dtype and device (a parameter of the model). Returns ``y`` as int64."""
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
    if x.is_floating_point() and x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{x_name} is {x.dtype} but the model's parameters are {like.dtype}; convert the batch with {x_name}.to({like.dtype})")
    for name, tensor in ((x_name, x), (y_name, y)):
        if tensor.device != like.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {like.device}; move the batch with .to({str(like.device)!r})")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{y_name} has label {bad} but num_classes={num_classes}; labels must lie in [0, {num_classes})")
    return y.long()
