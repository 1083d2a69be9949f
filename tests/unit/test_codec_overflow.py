"""Values near float32's max: no codec decodes a finite input to +-inf without flagging it.

A shard whose largest value lies in float32's top binade above the format's largest mantissa
there needs a scale whose grid reaches 2**128; a value that rounds up to such a grid point would
decode to inf. The encoder then sets the non-finite flag (the shard decodes to NaN on every
rank), bit-identically natively and eagerly.
"""

from __future__ import annotations

import pytest
import torch

from gradcomp.numerics import kernels
from gradcomp.codecs import BudgetCodec, FPCodec, PruneFPCodec, decode_payload, read_header

F32_MAX = float(torch.finfo(torch.float32).max)
CODECS = [FPCodec(6), FPCodec(8), FPCodec(4, rounding="nearest"), FPCodec(12), PruneFPCodec(0.5, 6),
          BudgetCodec(4.0), BudgetCodec(1.5)]


def _near_max(seed: int, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 0.999 + 0.001) * F32_MAX
    x = x.float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[0] = F32_MAX
    return x


def _encode_both(monkeypatch, codec, x, key):
    out = []
    for mode in ("native", "eager"):
        monkeypatch.setenv("GRADCOMP_KERNELS", mode)
        out.append(codec.encode(x, key=key))
    monkeypatch.delenv("GRADCOMP_KERNELS")
    return out


@pytest.mark.skipif(not kernels.warmup(), reason="native kernels unavailable")
@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_no_silent_inf_near_float32_max(monkeypatch, codec):
    flagged = 0
    for key in range(8):
        x = _near_max(key)
        native, eager = _encode_both(monkeypatch, codec, x, key)
        assert torch.equal(native, eager)
        y = decode_payload(native, x.numel())
        if read_header(native).nonfinite:
            flagged += 1
            assert torch.isnan(y).all()
        else:
            assert torch.isfinite(y).all(), (key, y[torch.isinf(y)])
    assert flagged > 0  # F32_MAX itself needs a grid reaching 2**128 in every format <= 16 bits


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_values_below_the_top_mantissa_are_not_flagged(codec):
    # Largest value 2**127: every format covers it with a grid that stays finite.
    x = _near_max(0) * 0.5
    for key in range(4):
        p = codec.encode(x, key=key)
        y = decode_payload(p, x.numel())
        assert not read_header(p).nonfinite and torch.isfinite(y).all()
