"""Argument checks shared by the wrapper and the strategies: one wording for every bad number."""

from __future__ import annotations

import math
import numbers


def check_number(value: object, name: str, *, positive: bool = False, signed: bool = False) -> float:
    """``value`` as a float: finite, and ``>= 0`` (``> 0`` with ``positive``; any sign with ``signed``).

    Raises a TypeError (not a finite real number) or ValueError (out of range) naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not signed and (value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)
