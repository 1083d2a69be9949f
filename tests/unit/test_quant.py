import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp import FPFormat, decode, encode, has_nonfinite, quantize

E3M2, E4M3 = FPFormat(3, 2), FPFormat(4, 3)


@pytest.mark.parametrize("fmt,x,expected", [
    # Ties to even mantissa in the normal range.
    (E3M2, 1.125, 1.0), (E3M2, 1.375, 1.5), (E3M2, -1.125, -1.0), (E3M2, 2.25, 2.0),
    (E4M3, 464.0, 448.0), (E4M3, 272.0, 256.0), (E4M3, 1.0625, 1.0), (E4M3, 1.1875, 1.25),
    # Ties in the subnormal range and at zero.
    (E3M2, 0.03125, 0.0), (E3M2, 0.09375, 0.125), (E3M2, 0.15625, 0.125), (E3M2, -0.03125, -0.0),
    # Rounding up across a binade boundary.
    (E3M2, 1.9, 2.0), (E3M2, 0.24, 0.25),
    # Overflow saturates; infinities saturate.
    (E3M2, 30.0, 28.0), (E3M2, 1e30, 28.0), (E3M2, -math.inf, -28.0), (E4M3, 470.0, 480.0),
    (E4M3, 1000.0, 480.0), (E4M3, math.inf, 480.0),
    # m = 0: ties go to the even code (1.5 between codes 3 and 4 -> 4; 0.75 between 2 and 3 -> 2).
    (FPFormat(3, 0), 1.5, 2.0), (FPFormat(3, 0), 0.75, 0.5),
])
def test_hand_written_cases(fmt, x, expected):
    got = quantize(torch.tensor([x]), fmt)
    assert got.item() == expected
    assert math.copysign(1.0, got.item()) == math.copysign(1.0, expected)


def test_nan_policy():
    x = torch.tensor([1.0, float("nan"), -2.0])
    q = quantize(x, E3M2)
    assert torch.isnan(q[1]) and q[0] == 1.0 and q[2] == -2.0
    with pytest.raises(ValueError, match="NaN"):
        encode(x, E3M2)
    codes = encode(x, E3M2, nan_check=False)
    assert decode(codes, E3M2)[1].abs().item() == E3M2.max  # saturates like inf
    assert bool(has_nonfinite(x)) and not bool(has_nonfinite(torch.ones(3)))
    assert bool(has_nonfinite(torch.tensor([math.inf])))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_shapes_and_identity(dtype, gen):
    x = (torch.randn(3, 5, 7, generator=gen) * 4).to(dtype)
    for rounding, kw in [("nearest", {}), ("stochastic", {"key": 11})]:
        q = quantize(x, E3M2, rounding, **kw)
        c = encode(x, E3M2, rounding, **kw)
        assert q.shape == x.shape == c.shape and q.dtype == torch.float32 and c.dtype == torch.uint8
        assert torch.equal(decode(c, E3M2).view(torch.int32), q.view(torch.int32))


def test_wide_formats_use_int32_codes():
    fmt = FPFormat(5, 10)
    c = encode(torch.tensor([1.0, -65504.0]), fmt)
    assert c.dtype == torch.int32 and decode(c, fmt).tolist() == [1.0, -65504.0]


def test_matches_float16_for_e5m10_in_range(gen):
    # e5m10 with the default bias is IEEE half without inf/NaN: same rounding in range.
    x = torch.randn(100_000, generator=gen) * 1000
    assert torch.equal(quantize(x, FPFormat(5, 10)), x.to(torch.float16).to(torch.float32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize(torch.ones(2), E3M2, "up")
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        quantize(torch.ones(2), E3M2, "stochastic")
    with pytest.raises(ValueError, match="either generator or key"):
        quantize(torch.ones(2), E3M2, "stochastic", torch.Generator(), key=1)
    with pytest.raises(ValueError, match="floating-point"):
        encode(torch.ones(2, dtype=torch.int32), E3M2)
    with pytest.raises(ValueError, match="codes must be in 0..63"):
        decode(torch.tensor([64]), E3M2)
    with pytest.raises(ValueError, match="integer tensor"):
        decode(torch.tensor([1.0]), E3M2)
    codes = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    for bad_out in (torch.empty(3), torch.empty(4, dtype=torch.float64), torch.empty(2, 2),
                    torch.empty(8)[::2], [0.0] * 4):
        with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of shape"):
            decode(codes, E3M2, out=bad_out)


def test_stochastic_generator_reproducible():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = quantize(x, E3M2, "stochastic", torch.Generator().manual_seed(5))
    b = quantize(x, E3M2, "stochastic", torch.Generator().manual_seed(5))
    c = quantize(x, E3M2, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- stochastic rounding is unbiased ---------------------------------------------------------
UNBIASED_CASES = [
    (E4M3, 1.3), (E4M3, -0.7123), (E4M3, 470.0), (E4M3, 3e-3), (E4M3, -1e-4),  # normal, near max, subnormal
    (E3M2, 0.0123), (E3M2, 27.3), (FPFormat(2, 1), 0.26), (FPFormat(3, 0), 1.37),
    (FPFormat(5, 2), 1e-6), (E4M3, 2.0**-12),  # far below the smallest subnormal
]


@pytest.mark.parametrize("fmt,v", UNBIASED_CASES)
def test_stochastic_rounding_is_unbiased(fmt, v):
    n = 200_000
    q = quantize(torch.full((n,), v), fmt, "stochastic", key=2024).double()
    se = q.std().item() / math.sqrt(n)
    v32 = float(torch.tensor(v, dtype=torch.float32))
    assert abs(q.mean().item() - v32) <= 4 * se + 1e-12 * abs(v32)
    # Only the two neighbouring grid points appear.
    assert q.unique().numel() <= 2


def test_stochastic_unbiased_across_keys():
    # The same element over many independent keys (generator draws).
    g = torch.Generator().manual_seed(3)
    x = torch.tensor([1.3, 0.0037, -300.0])
    draws = torch.stack([quantize(x, E4M3, "stochastic", g) for _ in range(3000)]).double()
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - x.double()).abs() <= 4 * se).all()


# ---- hypothesis properties ------------------------------------------------------------------
FORMATS = st.sampled_from([E3M2, E4M3, FPFormat(2, 3), FPFormat(5, 2), FPFormat(2, 1),
                           FPFormat(3, 4), FPFormat(6, 5), FPFormat(4, 0)])
FLOATS = st.floats(allow_nan=False, width=32, min_value=-1e6, max_value=1e6)


@settings(max_examples=200, deadline=None)
@given(FORMATS, st.lists(FLOATS, min_size=1, max_size=50))
def test_idempotent(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float32)
    q = quantize(x, fmt)
    assert torch.equal(quantize(q, fmt).view(torch.int32), q.view(torch.int32))


@settings(max_examples=200, deadline=None)
@given(FORMATS, st.lists(FLOATS, min_size=2, max_size=50))
def test_monotone(fmt, xs):
    x = torch.tensor(sorted(xs), dtype=torch.float32)
    q = quantize(x, fmt)
    assert (q[1:] >= q[:-1]).all()


@settings(max_examples=200, deadline=None)
@given(FORMATS, st.lists(FLOATS, min_size=1, max_size=50))
def test_relative_error_bound_in_normal_range(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    x = x[(x.abs() >= fmt.min_normal) & (x.abs() <= fmt.max)]
    if x.numel():
        rel = ((quantize(x, fmt).double() - x).abs() / x.abs())
        assert (rel <= 2.0 ** -(fmt.man_bits + 1)).all()


@settings(max_examples=100, deadline=None)
@given(FORMATS, st.lists(FLOATS, min_size=1, max_size=50), st.integers(0, 2**63 - 1))
def test_stochastic_lands_on_a_neighbour(fmt, xs, key):
    x = torch.tensor(xs, dtype=torch.float32)
    lo = quantize(x, fmt)  # nearest is one of the two neighbours; check the bracket instead
    s = quantize(x, fmt, "stochastic", key=key)
    grid = torch.tensor(fmt.code_values(), dtype=torch.float64)
    ax = x.double().abs().clamp(max=fmt.max)
    hi_idx = torch.searchsorted(grid, ax).clamp(max=grid.numel() - 1)
    lo_idx = (hi_idx - (grid[hi_idx] > ax).long()).clamp(min=0)
    assert ((s.double().abs() == grid[lo_idx]) | (s.double().abs() == grid[hi_idx])).all()
    assert torch.equal(torch.signbit(s), torch.signbit(x)) or bool((lo == 0).any())


@pytest.mark.parametrize("k", [-20, -3, 0, 5, 30])
def test_scale_exp_is_exact_power_of_two_scaling(k, gen):
    x = torch.randn(50_000, generator=gen, dtype=torch.float64).mul(3).exp() * 2.0**k
    for fmt in (E3M2, FPFormat(2, 1), FPFormat(5, 2)):
        ref = encode((x * 2.0**-k), fmt)  # float64 scaling is exact here
        assert torch.equal(encode(x, fmt, scale_exp=k), ref)
        assert torch.equal(quantize(x, fmt, scale_exp=k), decode(ref, fmt, scale_exp=k))
        assert torch.equal(decode(ref, fmt, scale_exp=k).double(), decode(ref, fmt).double() * 2.0**k)
    with pytest.raises(ValueError, match="scale_exp must be an int"):
        encode(x, E3M2, scale_exp=1.5)


def test_scale_exp_keeps_tiny_float32_values():
    # float32 subnormals scaled up by 2**149 land exactly on the grid (1, 3, 8 and 2**-3 * 3);
    # the kernel must read their true binade, not the subnormal exponent -126.
    x = torch.tensor([2.0**-149, 3 * 2.0**-149, 2.0**-146, 2.0**-130], dtype=torch.float32)
    got = quantize(x, E4M3, scale_exp=-149)
    assert got.tolist() == [2.0**-149, 3 * 2.0**-149, 2.0**-146, 480 * 2.0**-149]
    # And with a scale that puts them in the subnormal range of the format.
    x = torch.tensor([2.0**-149, 2.0**-140], dtype=torch.float32)
    assert encode(x, E4M3, scale_exp=-140).tolist() == [1, 0b0111000]  # 2**-9 is min_subnormal


def test_scale_at_the_float32_subnormal_boundary():
    # The scaled format's smallest subnormal equals float32's (2**-149): every float32
    # subnormal is then exactly on the grid, and zero stays zero (this once computed 1 << -1).
    fmt = FPFormat(2, 0)  # min_subnormal_exponent 0
    x = torch.tensor([0.0, -0.0, 2.0**-149, 2.0**-148, 3 * 2.0**-149], dtype=torch.float32)
    # 3 is a tie between 2 (code 2) and 4 (code 3): the even code wins.
    assert quantize(x, fmt, scale_exp=-149).tolist() == [0.0, -0.0, 2.0**-149, 2.0**-148, 2.0**-148]
    assert encode(x, fmt, scale_exp=-149).tolist()[:2] == [0, 4]
