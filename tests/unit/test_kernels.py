"""The native fast path is bit-identical to the eager reference (random and edge inputs)."""

import contextlib
import math
import os

import pytest
import torch

from gradcomp import FPFormat
from gradcomp.numerics import kernels
from gradcomp.numerics.packing import pack_unchecked, unpack
from gradcomp.numerics.quant import _F32, _encode_bits, decode_table
from gradcomp.numerics.rng import derive_key

pytestmark = pytest.mark.skipif(kernels.kernel_mode() == "eager", reason="GRADCOMP_KERNELS=eager")


@pytest.fixture(scope="module")
def native():
    mod = kernels.native()
    if mod is None and kernels.kernel_mode() == "auto":
        pytest.skip("native kernels could not be built here (warning says why)")
    return mod


def _all_formats():
    for e in range(1, 9):
        for m in range(0, 11):
            if 1 + e + m <= 16:
                try:
                    yield FPFormat(e, m)
                except ValueError:
                    yield FPFormat(e, m, bias=128)


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70_011, generator=g).mul(3).exp() * torch.where(torch.rand(70_011, generator=g) < 0.5, -1.0, 1.0)
    edge = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-149, -(2.0**-149), 2.0**-126,
                         3.4e38, -3.4e38, 1.0, 1.5, 1.25, 1.125, 1e-30, 65504.0, 480.0, 464.0])
    sub = torch.arange(1, 300, dtype=torch.int32).view(torch.float32)  # float32 subnormals
    return torch.cat([edge, x, sub, -sub])


@contextlib.contextmanager
def _eager():
    """Run the block on the eager reference (pack/unpack use the native kernels by default)."""
    before = os.environ.get("GRADCOMP_KERNELS")
    os.environ["GRADCOMP_KERNELS"] = "eager"
    try:
        yield
    finally:
        if before is None:
            del os.environ["GRADCOMP_KERNELS"]
        else:
            os.environ["GRADCOMP_KERNELS"] = before


def _reference(x, fmt, stochastic, key, k):
    with _eager():
        return pack_unchecked(_encode_bits(x, _F32, fmt, stochastic, key, k), fmt.bits)


def _unpack_ref(packed, bits, numel):
    with _eager():
        return unpack(packed, bits, numel)


@pytest.mark.parametrize("fmt", list(_all_formats()), ids=lambda f: f.name)
def test_encode_pack_and_unpack_decode_match_eager(native, fmt):
    x = _inputs()
    for stochastic in (False, True):
        for k in (-149, -20, 0, 9):
            key = derive_key(fmt.bits, k)
            ref = _reference(x, fmt, stochastic, key, k)
            got = kernels.encode_pack(x, fmt, stochastic, key, k)
            assert torch.equal(got, ref), (fmt, stochastic, k)
            table = decode_table(fmt, "cpu", k)
            out = torch.empty_like(x)
            assert kernels.unpack_decode(got, table, fmt.bits, out)
            want = table[_unpack_ref(ref, fmt.bits, x.numel()).long()]
            assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (fmt, stochastic, k)


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 63, 64, 65, 65_536, 65_537, 200_003])
def test_sizes_and_chunk_boundaries(native, numel):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g)
    for fmt in (FPFormat(3, 2), FPFormat(4, 3), FPFormat(5, 10), FPFormat(2, 0)):
        ref = _reference(x, fmt, True, 77, 0)
        got = kernels.encode_pack(x, fmt, True, 77, 0)
        assert torch.equal(got, ref)
        out = torch.empty(numel)
        kernels.unpack_decode(got, decode_table(fmt), fmt.bits, out)
        assert torch.equal(out, decode_table(fmt)[_unpack_ref(ref, fmt.bits, numel).long()])


def test_not_applicable_falls_back(native):
    assert kernels.encode_pack(torch.ones(4, dtype=torch.float64), FPFormat(3, 2), False, 0, 0) is None
    assert kernels.unpack_decode(torch.zeros(3, dtype=torch.uint8), decode_table(FPFormat(3, 2)), 6,
                                 torch.empty(8)[::2]) is False


def test_mode_validation(monkeypatch):
    monkeypatch.setenv("GRADCOMP_KERNELS", "fast")
    with pytest.raises(ValueError, match="GRADCOMP_KERNELS must be one of"):
        kernels.kernel_mode()
    monkeypatch.setenv("GRADCOMP_KERNELS", "eager")
    assert kernels.native() is None


@pytest.mark.parametrize("fmt", list(_all_formats()), ids=lambda f: f.name)
def test_format_functions_match_eager(native, fmt):
    """gradcomp.encode / decode / pack / unpack: native (default) and eager give the same bits."""
    import gradcomp

    x = _inputs()
    x = x[~x.isnan()][:70_616].reshape(-1, 8)  # 2-D, no NaN (encode refuses NaN by default)
    for rounding, k in (("nearest", 0), ("stochastic", -20), ("nearest", 9)):
        key = 5 if rounding == "stochastic" else None
        codes = gradcomp.encode(x, fmt, rounding, key=key, scale_exp=k)
        with _eager():
            ref = gradcomp.encode(x, fmt, rounding, key=key, scale_exp=k)
        assert codes.dtype == ref.dtype and codes.shape == ref.shape and torch.equal(codes, ref)
        packed = gradcomp.pack(codes, fmt.bits)
        with _eager():
            assert torch.equal(packed, gradcomp.pack(codes, fmt.bits))
            unpacked_ref = gradcomp.unpack(packed, fmt.bits, codes.numel())
        unpacked = gradcomp.unpack(packed, fmt.bits, codes.numel())
        assert unpacked.dtype == unpacked_ref.dtype and torch.equal(unpacked, unpacked_ref)
        values = gradcomp.decode(codes, fmt, scale_exp=k)
        with _eager():
            want = gradcomp.decode(codes, fmt, scale_exp=k)
            into = torch.full(codes.shape, math.nan)
            assert gradcomp.decode(codes, fmt, scale_exp=k, out=into) is into
            assert torch.equal(into.view(torch.int32), want.view(torch.int32))
        assert values.shape == want.shape and torch.equal(values.view(torch.int32), want.view(torch.int32))
        into = torch.full(codes.shape, math.nan)
        assert gradcomp.decode(codes, fmt, scale_exp=k, out=into) is into
        assert torch.equal(into.view(torch.int32), want.view(torch.int32))


def test_decode_rejects_out_of_range_codes_like_eager(native):
    import gradcomp

    fmt = FPFormat(2, 1)
    for bad in (torch.tensor([1, 16], dtype=torch.uint8), torch.tensor([3, -1], dtype=torch.int32)):
        with pytest.raises(ValueError, match="codes must be in 0..15"):
            gradcomp.decode(bad, fmt)
