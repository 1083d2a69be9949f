"""Numerics: float formats, rounding, packing, counter-based RNG, native kernels, lognormal fits and the error model."""
