"""The codec contract, checked on every codec the registry decodes.

One parametrized test per clause of :class:`gradcomp.codecs.base.Codec`'s contract: payloads
are self-describing (the header's tag is the codec's layout, decode_payload and codec.decode
agree), the declared size is the size (or, for data-dependent layouts, the expectation is
close), ``plan(fit, numel)`` is what ``encode`` derives itself, stochastic codecs are unbiased,
truncated payloads raise ``ValueError``, and the error-feedback invariant
``input == decoded + residual`` holds up to the one rounding of the residual's subtraction.
"""

import math

import pytest
import torch

from gradcomp.codecs import (BudgetCodec, CodecTag, FPCodec, HalfCodec, IdentityCodec, PruneCodec,
                             PruneFPCodec, TopKCodec, decode_payload, read_header)
from gradcomp.codecs.base import fit_or_none
from gradcomp.codecs.registry import DECODERS

CODECS = [IdentityCodec(), HalfCodec(), FPCodec(6), FPCodec(4, exp_bits=2, rounding="nearest"),
          FPCodec(8, criterion="relative"), PruneCodec(0.85), PruneFPCodec(0.85, 6),
          PruneFPCodec(0.5, 8, rounding="nearest"), BudgetCodec(1.5), BudgetCodec(8.0), TopKCodec(0.05)]
LAYOUT_TAGS = {CodecTag.IDENTITY, CodecTag.HALF, CodecTag.FP, CodecTag.PRUNE, CodecTag.PRUNE_FP,
               CodecTag.TOPK}


def _grad(n: int, seed: int = 0, zeros: float = 0.3, sigma: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).mul(sigma).sub(6.0).exp()
    x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return x * (torch.rand(n, generator=g) >= zeros)


def test_every_layout_is_registered_and_every_codec_covered():
    assert set(DECODERS) == set(CodecTag)
    seen = {read_header(c.encode(_grad(500), key=1)).tag for c in CODECS}
    assert seen == LAYOUT_TAGS  # SEGMENTS is the hook's container (tests/unit/test_segments.py)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_self_describing_round_trip(codec):
    x = _grad(3000, 1)
    payload = codec.encode(x, key=5)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    y = decode_payload(payload, x.numel())
    assert y.dtype == torch.float32 and y.shape == (3000,)
    assert torch.equal(codec.decode(payload, 3000).view(torch.int32), y.view(torch.int32))
    out = torch.full((3000,), 7.0)
    assert decode_payload(payload, 3000, out=out) is out and torch.equal(out, y)
    assert torch.isfinite(y).all()
    err = float((y.double() - x.double()).norm() / x.double().norm())
    assert err < 1.5, err  # carries the signal (pruning at 85 % has a relative error near 0.5-1)
    assert not bool(((x == 0) & (y != 0) & torch.tensor(isinstance(codec, (FPCodec, HalfCodec, IdentityCodec)))).any())


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_declared_size(codec):
    x = _grad(200_000, 2)
    fit = fit_or_none(x)
    payload = codec.encode(x, key=3, plan=codec.plan(fit, x.numel()))
    fixed = codec.wire_bytes(x.numel())
    if fixed is not None:
        assert payload.numel() == fixed == codec.expected_wire_bytes(x.numel(), fit)
    else:
        assert payload.numel() == pytest.approx(codec.expected_wire_bytes(x.numel(), fit), rel=0.1)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_plan_of_fit_and_numel_is_what_encode_derives(codec):
    x = _grad(5000, 3)
    a = codec.encode(x, key=11)
    b = codec.encode(x, key=11, plan=codec.plan(fit_or_none(x), x.numel()))
    assert torch.equal(a, b)
    empty = codec.encode(torch.zeros(10), key=1, plan=codec.plan(None, 10))
    assert torch.equal(decode_payload(empty, 10), torch.zeros(10))


@pytest.mark.parametrize("codec", [c for c in CODECS if c.stochastic], ids=repr)
def test_stochastic_codecs_are_unbiased(codec):
    # sigma 0.5: every entry is kept with a probability well above 1/trials (a rarer one would
    # never be drawn, and its sample variance would be 0)
    x = _grad(64, 4, zeros=0.2, sigma=0.5)
    plan = codec.plan(fit_or_none(x), x.numel())
    trials = 3000
    acc = torch.zeros(64, dtype=torch.float64)
    sq = torch.zeros(64, dtype=torch.float64)
    for k in range(trials):
        y = decode_payload(codec.encode(x, key=k, plan=plan), 64).double()
        acc += y
        sq += y * y
    mean = acc / trials
    sem = ((sq / trials - mean**2).clamp(min=0) / trials).sqrt()
    z = (mean - x.double()).abs() / sem.clamp(min=1e-30)
    ok = (z < 5) | (mean == x.double())
    assert ok.all(), (codec, z.max())


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_truncated_payloads_raise(codec):
    x = _grad(1000, 5, zeros=0.0)
    payload = codec.encode(x, key=2)
    for bad in (payload[:4], payload[:-1], payload[: payload.numel() // 2]):
        with pytest.raises(ValueError):
            decode_payload(bad, 1000)
    with pytest.raises(ValueError):
        decode_payload(payload, -1)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_error_feedback_invariant(codec):
    """input == decoded + residual: the residual the hook keeps (x - decode(encode(x))) makes up
    exactly what the payload failed to carry, up to the rounding of that one float32 subtraction."""
    x = _grad(4000, 6)
    d = decode_payload(codec.encode(x, key=9), x.numel())
    residual = x - d
    gap = (d.double() + residual.double() - x.double()).abs()
    ulp = torch.finfo(torch.float32).eps * residual.double().abs()
    assert (gap <= ulp / 2 + 2.0**-149).all()
    assert math.isclose(float((d.double() + residual.double()).sum()), float(x.double().sum()),
                        rel_tol=1e-6, abs_tol=1e-30)
