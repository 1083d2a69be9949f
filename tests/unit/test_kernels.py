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
        # -126 - min_exponent: the lowest scale of the common path (no float32 subnormal
        # arithmetic); one below it the kernel takes the RARE path. Both edges, every format.
        edge = -126 - fmt.min_exponent
        for k in (-149, -20, 0, 9, edge, edge - 1, edge + 1):
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
        # The fused public path: encode(packed=True) is pack(encode()), decode(packed=True) is
        # decode(unpack()), on the native kernels and on the eager reference alike.
        for run in (contextlib.nullcontext, _eager):
            with run():
                wire = gradcomp.encode(x, fmt, rounding, key=key, scale_exp=k, packed=True)
                assert wire.dtype == torch.uint8 and torch.equal(wire, packed)
                flat = gradcomp.decode(wire, fmt, scale_exp=k, packed=True, numel=x.numel())
                assert flat.shape == (x.numel(),)
                assert torch.equal(flat.view(torch.int32), want.view(-1).view(torch.int32))
                into = torch.full(codes.shape, math.nan)
                assert gradcomp.decode(wire, fmt, scale_exp=k, packed=True, out=into) is into
                assert torch.equal(into.view(torch.int32), want.view(torch.int32))


def test_packed_format_functions_check_their_arguments(native):
    import gradcomp

    fmt = FPFormat(3, 2)
    x = torch.tensor([1.0, -2.0, 3.0])
    wire = gradcomp.encode(x, fmt, packed=True)
    assert wire.numel() == 3  # ceil(3 * 6 / 8)
    for run in (contextlib.nullcontext, _eager):
        with run():
            with pytest.raises(ValueError, match="has no NaN code"):
                gradcomp.encode(torch.tensor([1.0, math.nan]), fmt, packed=True)
            inf = gradcomp.encode(torch.tensor([1.0, -math.inf]), fmt, packed=True)  # saturates
            assert gradcomp.decode(inf, fmt, packed=True, numel=2).tolist() == [1.0, -fmt.max]
            assert gradcomp.encode(torch.empty(0), fmt, packed=True).numel() == 0
            assert gradcomp.decode(torch.empty(0, dtype=torch.uint8), fmt, packed=True, numel=0).numel() == 0
            with pytest.raises(ValueError, match="3 codes of 6 bits need 3 bytes, got 2"):
                gradcomp.decode(wire[:2], fmt, packed=True, numel=3)
            with pytest.raises(ValueError, match="needs numel"):
                gradcomp.decode(wire, fmt, packed=True)
            with pytest.raises(ValueError, match="1-D uint8"):
                gradcomp.decode(wire.to(torch.int32), fmt, packed=True, numel=3)
            with pytest.raises(ValueError, match="out holds 4 elements"):
                gradcomp.decode(wire, fmt, packed=True, numel=3, out=torch.empty(4))
            with pytest.raises(ValueError, match="only for packed=True"):
                gradcomp.decode(gradcomp.encode(x, fmt), fmt, numel=3)
            with pytest.raises(ValueError, match="packed must be a bool"):
                gradcomp.encode(x, fmt, packed=1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fp_kernels_do_not_depend_on_thread_count(native, threads):
    """Encode+pack, unpack+decode and decode-mean split across torch's intra-op threads in
    chunks; the bytes and bits are those of one thread (and of the eager path) for any count.
    1,000,003 elements: 16 chunks and a tail, so 3 threads get uneven shares."""
    x = _inputs()
    x = torch.cat([x, x.flip(0)] * 7 + [x[:1_000_003 - 14 * x.numel()]])
    x = x[~x.isnan()]
    before = torch.get_num_threads()
    results = {}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            got = []
            for fmt, stochastic in ((FPFormat(3, 2), True), (FPFormat(4, 3), False), (FPFormat(2, 1), True),
                                    (FPFormat(5, 6), True)):
                out = kernels.encode_pack_with_stats(x, fmt, stochastic, derive_key(3), -4, 5)
                assert out is not None
                buf, max_abs, bad = out
                wire = buf[5:]
                decoded = torch.empty(x.numel())
                assert kernels.unpack_decode(wire, decode_table(fmt, scale_exp=-4), fmt.bits, decoded)
                mean = torch.empty(x.numel())
                assert kernels.decode_mean([wire, wire], [decode_table(fmt, scale_exp=-4)] * 2, [fmt.bits] * 2, 2, mean)
                got.append((wire, max_abs, bad, decoded.view(torch.int32), mean.view(torch.int32)))
            results[n] = got
    finally:
        torch.set_num_threads(before)
    for one, many in zip(results[1], results[threads]):
        assert torch.equal(one[0], many[0]) and one[1:3] == many[1:3]
        assert torch.equal(one[3], many[3]) and torch.equal(one[4], many[4])
    fmt = FPFormat(3, 2)
    assert torch.equal(results[threads][0][0], _reference(x, fmt, True, derive_key(3), -4))
    finite = x[x.isfinite()]
    assert results[threads][0][1] == float(finite.abs().max()) and results[threads][0][2] == bool((~x.isfinite()).any())


@pytest.mark.parametrize("where", [0, 63, 64, 65_535, 65_536, 999_999])
def test_encode_pack_statistics(native, where):
    """max |x| over finite entries and the inf/NaN flag, wherever the extreme entry sits (first,
    last of a block, of a chunk, in the tail), for the stochastic and nearest kernels."""
    x = _lognormal_like(1_000_000)
    for special, flag in ((3.0e38, False), (math.inf, True), (-math.nan, True)):
        y = x.clone()
        y[where] = special
        for stochastic in (False, True):
            out = kernels.encode_pack_with_stats(y, FPFormat(3, 2), stochastic, 9, 0, 0)
            assert out is not None
            want = float(y[y.isfinite()].abs().max())
            assert out[1] == want and out[2] == flag, (special, stochastic)


def _lognormal_like(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g).mul(2).exp() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


def test_decode_rejects_out_of_range_codes_like_eager(native):
    import gradcomp

    fmt = FPFormat(2, 1)
    for bad in (torch.tensor([1, 16], dtype=torch.uint8), torch.tensor([3, -1], dtype=torch.int32)):
        with pytest.raises(ValueError, match="codes must be in 0..15"):
            gradcomp.decode(bad, fmt)
