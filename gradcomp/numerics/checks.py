"""Argument checks shared by the numerics modules: real numbers, sigma, rounding mode.

Each check returns the normalized value or raises ``ValueError`` with the argument's name and
the offending value; nothing else is done (no clamping, no conversion beyond ``float``).

Example:
    >>> check_real(2, "mu"), check_sigma(0.5), check_rounding("nearest")
    (2.0, 0.5, 'nearest')
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ROUNDING_MODES", "check_real", "check_rounding", "check_sigma"]

ROUNDING_MODES = ("nearest", "stochastic")


def check_real(value, name: str) -> float:
    """Return ``value`` as a finite float or raise ``ValueError`` (bools are not numbers here)."""
    real_types = (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, real_types):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return out


def check_sigma(value) -> float:
    """Return a lognormal ``sigma`` (std of ``ln|x|``, natural log) as a float ``>= 0``."""
    out = check_real(value, "sigma")
    if out < 0:
        raise ValueError(f"sigma must be >= 0 (std of ln|x|, natural log), got {value!r}")
    return out


def check_rounding(value) -> str:
    """Return ``value`` if it is one of :data:`ROUNDING_MODES`."""
    if value not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {value!r}")
    return value
