"""Bit-exact comparisons against ml_dtypes, torch float8 and a pure-Python grid reference."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from gradcomp import FPFormat, decode, encode, quantize

from .grid import reference_code

ALL_F16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)

ML_DTYPES = [
    ("float4_e2m1fn", FPFormat(2, 1)),
    ("float6_e2m3fn", FPFormat(2, 3)),
    ("float6_e3m2fn", FPFormat(3, 2)),
    ("float8_e4m3fn", FPFormat(4, 3)),
    # ml_dtypes' e5m2 has inf/NaN codes in its top binade; ours is finite there. In its finite
    # range the two agree bit for bit.
    ("float8_e5m2", FPFormat(5, 2)),
]


def _ml_codes(x: torch.Tensor, name: str) -> torch.Tensor:
    dt = getattr(ml_dtypes, name)
    return torch.from_numpy(x.numpy().astype(dt).view(np.uint8).astype(np.int64))


def _in_range(x: torch.Tensor, name: str) -> torch.Tensor:
    mx = float(ml_dtypes.finfo(getattr(ml_dtypes, name)).max)
    return x[torch.isfinite(x) & (x.abs() <= mx)]


@pytest.mark.parametrize("name,fmt", ML_DTYPES, ids=[n for n, _ in ML_DTYPES])
def test_every_float16_in_range_matches_ml_dtypes(name, fmt):
    x = _in_range(ALL_F16.to(torch.float32), name)
    ours = encode(x, fmt)
    assert ours.dtype == torch.uint8
    ref = _ml_codes(x, name)
    assert torch.equal(ours.to(torch.int64), ref)
    # Values too (compared as bit patterns, so -0.0 and +0.0 are distinct).
    ref_vals = torch.from_numpy(x.numpy().astype(getattr(ml_dtypes, name)).astype(np.float32))
    assert torch.equal(quantize(x, fmt).view(torch.int32), ref_vals.view(torch.int32))
    # And from the float16 tensor itself (widened internally).
    assert torch.equal(encode(x.to(torch.float16), fmt), ours)


@pytest.mark.parametrize("name,fmt", ML_DTYPES, ids=[n for n, _ in ML_DTYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_random_inputs_in_range_match_ml_dtypes(name, fmt, dtype, gen):
    mx = float(ml_dtypes.finfo(getattr(ml_dtypes, name)).max)
    # Log-uniform magnitudes across the whole range, subnormals and below included.
    mag = torch.exp2(torch.empty(200_000, dtype=torch.float64).uniform_(
        fmt.min_subnormal_exponent - 3, math.log2(mx), generator=gen))
    x = (mag * torch.where(torch.rand(mag.shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0))
    # ml_dtypes rounds float64 through float32 (double rounding), so float64 is compared on
    # float32-representable values; test_float64_has_no_double_rounding covers the rest.
    x = x.to(torch.float32).to(dtype)
    x = x[x.abs() <= mx]
    assert torch.equal(encode(x, fmt).to(torch.int64), _ml_codes(x.to(torch.float32), name))


def test_float64_has_no_double_rounding():
    # Just below the 208/224 tie of e4m3 (216), but float32(x) == 216 exactly: float32 first
    # would round to even (224); the true nearest is 208.
    x = float.fromhex("0x1.afffffe4d7381p+7")
    fmt = FPFormat(4, 3)
    assert quantize(torch.tensor([x], dtype=torch.float64), fmt).item() == 208.0
    assert encode(torch.tensor([x], dtype=torch.float64), fmt).item() == reference_code(x, fmt)
    assert quantize(torch.tensor([x], dtype=torch.float32), fmt).item() == 224.0


@pytest.mark.parametrize("torch_dtype,fmt", [(torch.float8_e4m3fn, FPFormat(4, 3)),
                                             (torch.float8_e5m2, FPFormat(5, 2))])
def test_torch_float8_in_range(torch_dtype, fmt):
    x = ALL_F16.to(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() <= torch.finfo(torch_dtype).max)]
    ref = x.to(torch_dtype).view(torch.uint8)
    assert torch.equal(encode(x, fmt), ref)


CUSTOM = [FPFormat(2, 2), FPFormat(4, 2), FPFormat(3, 3), FPFormat(1, 2), FPFormat(3, 0),
          FPFormat(2, 0), FPFormat(5, 0), FPFormat(3, 4), FPFormat(6, 1), FPFormat(4, 3, bias=9),
          FPFormat(3, 2, bias=1), FPFormat(4, 10), FPFormat(8, 7, bias=140)]


def _probe_values(fmt: FPFormat) -> list[float]:
    """Every grid point, every midpoint (ties), and points just either side, both signs."""
    grid = fmt.code_values()
    vals = set(grid)
    for lo, hi in zip(grid, grid[1:]):
        mid = (lo + hi) / 2
        vals.update([mid, math.nextafter(mid, 0.0), math.nextafter(mid, math.inf),
                     lo + (hi - lo) * 0.3])
    vals.update([grid[-1] * 1.5, grid[-1] * 1e6, grid[1] / 2, grid[1] / 3, grid[1] * 1e-9])
    vals = [v for v in vals if v < 3e38]
    return sorted(vals) + [-v for v in vals]


@pytest.mark.parametrize("fmt", CUSTOM, ids=[f.name for f in CUSTOM])
def test_custom_formats_match_grid_reference(fmt):
    vals = _probe_values(fmt)
    x = torch.tensor(vals, dtype=torch.float64)
    expected = torch.tensor([reference_code(v, fmt) for v in vals])
    assert torch.equal(encode(x, fmt).to(torch.int64), expected)
    # float32 inputs: reference on the float32-rounded value.
    x32 = x.to(torch.float32)
    expected32 = torch.tensor([reference_code(v, fmt) for v in x32.tolist()])
    assert torch.equal(encode(x32, fmt).to(torch.int64), expected32)


def _all_formats(max_bits: int):
    for e in range(1, 9):
        for m in range(0, 11):
            if 1 + e + m <= max_bits:
                try:
                    yield FPFormat(e, m)
                except ValueError:  # e8 with the default bias does not fit float32
                    yield FPFormat(e, m, bias=128)


@pytest.mark.parametrize("fmt", list(_all_formats(16)), ids=lambda f: f.name)
def test_every_code_round_trips(fmt):
    codes = torch.arange(fmt.num_codes, dtype=torch.int64)
    values = decode(codes, fmt)
    assert values.dtype == torch.float32
    assert torch.isfinite(values).all()
    assert torch.equal(encode(values, fmt).to(torch.int64), codes)
    # Magnitudes strictly increase with the code, and the sign bit negates.
    mags = values[: fmt.sign_bit]
    assert (mags[1:] > mags[:-1]).all()
    assert torch.equal(values[fmt.sign_bit:], -mags)
    assert mags[-1].item() == fmt.max and mags[1].item() == fmt.min_subnormal
    # And both roundings leave grid values unchanged.
    assert torch.equal(quantize(values, fmt, "stochastic", key=7).view(torch.int32),
                       values.view(torch.int32))


def test_every_code_of_8_bit_formats_is_listed():
    names = {f.name for f in _all_formats(8)}
    assert {"float8_e4m3fn", "float8_e5m2fn", "float6_e3m2fn", "float4_e2m1fn",
            "float8_e1m6fn", "float2_e1m0fn", "float8_e7m0fn"} <= names
    assert len(names) == sum(8 - e for e in range(1, 8))  # e in 1..7, m in 0..7-e
