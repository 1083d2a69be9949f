"""The codec contract and the payload header every codec writes.

A codec turns a 1-D float32 shard into a self-describing uint8 payload and back. Codecs are
stateless: everything a decoder needs travels in the payload, so any rank decodes any payload
with :func:`gradcomp.codecs.decode_payload` without knowing who encoded it or with which
options. What a codec may reuse between steps (a lognormal fit and the format, scale and
threshold derived from it) is a *plan*, computed by :meth:`Codec.plan` and cached by the caller
(the hook state); ``encode(x)`` without a plan fits ``x`` itself.

Header (``HEADER_BYTES = 8``, little-endian), first in every payload::

    byte 0      codec tag (CodecTag)
    byte 1      flags: bit 0 = the input held inf or NaN, or a value would decode beyond
                float32's range (decoders then return all-NaN)
    byte 2      exponent bits of the value format (0 if none)
    byte 3      mantissa bits of the value format
    bytes 4-5   int16 power-of-two scale exponent k (values were multiplied by 2**-k)
    byte 6      int8 bias offset: bias - default bias of the value format
    byte 7      reserved, 0

Codec-specific fields follow the header.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gradcomp.numerics import lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.quant import has_nonfinite

HEADER_BYTES = 8
FLAG_NONFINITE = 1


class CodecTag(enum.IntEnum):
    IDENTITY = 1
    HALF = 2
    FP = 3
    PRUNE = 4
    PRUNE_FP = 5
    TOPK = 6
    SEGMENTS = 7  # a shard in segments, one payload each (gradcomp.codecs.segments)


@dataclass(frozen=True)
class Header:
    """Decoded payload header."""

    tag: CodecTag
    nonfinite: bool
    fmt: FPFormat | None
    scale_exp: int


def make_header(
    tag: CodecTag,
    x: torch.Tensor,
    fmt: FPFormat | None = None,
    scale_exp: int = 0,
    nonfinite: bool | None = None,
) -> torch.Tensor:
    """Return the 8-byte header for a payload of ``x`` on ``x``'s device.

    The non-finite flag is ``nonfinite`` when the caller already knows it (one pass saved),
    else computed on the device from ``x`` without a host sync.
    """
    e = fmt.exp_bits if fmt is not None else 0
    m = fmt.man_bits if fmt is not None else 0
    bias_off = fmt.bias - fmt.default_bias if fmt is not None else 0
    if not -128 <= bias_off <= 127 or not -(2**15) <= scale_exp < 2**15:
        raise ValueError(f"header cannot carry bias offset {bias_off} / scale exponent {scale_exp}")
    k = scale_exp & 0xFFFF
    static = torch.tensor([int(tag), 0, e, m, k & 0xFF, k >> 8, bias_off & 0xFF, 0],
                          dtype=torch.uint8, device=x.device)
    if nonfinite is not None:
        static[1] = FLAG_NONFINITE if nonfinite else 0
        return static
    flag = has_nonfinite(x).to(torch.uint8) * FLAG_NONFINITE
    return torch.cat([static[:1], flag.view(1), static[2:]])


def read_header(payload: torch.Tensor) -> Header:
    """Parse the header of ``payload`` (one small device-to-host copy on GPUs)."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError("payload must be a 1-D uint8 tensor")
    if payload.numel() < HEADER_BYTES:
        raise ValueError(f"payload of {payload.numel()} bytes is shorter than the {HEADER_BYTES}-byte header")
    b = payload[:HEADER_BYTES].tolist()
    try:
        tag = CodecTag(b[0])
    except ValueError:
        raise ValueError(f"unknown codec tag {b[0]} in payload header") from None
    k = b[4] | (b[5] << 8)
    k = k - (1 << 16) if k >= 1 << 15 else k
    fmt = None
    if b[2]:
        bias_off = b[6] - 256 if b[6] >= 128 else b[6]
        fmt = FPFormat(b[2], b[3], 2 ** (b[2] - 1) - 1 + bias_off)
    return Header(tag, bool(b[1] & FLAG_NONFINITE), fmt, k)


# Magnitudes a ShardFit keeps as its sample: enough for a survivor count within a few percent
# of a shard's (binomial error sqrt(S(1-S)/n) relative to 1-S), small enough for checkpoints.
SAMPLE_SIZE = 512
_SAMPLE_STRIDE_TARGET = 8 * SAMPLE_SIZE  # entries looked at (a strided subsample) before sorting


@dataclass(frozen=True)
class ShardFit(lognormal.LognormalFit):
    """A lognormal fit of a shard, its largest finite magnitude (for no-saturation scales) and a
    sample of its usable magnitudes.

    ``sample``: ascending ``|x|`` of up to :data:`SAMPLE_SIZE` usable (nonzero finite) entries,
    the evenly spaced order statistics of a strided subsample (every ``ceil(numel / 4096)``-th
    entry, so deterministic). Planners that need how many entries lie below a threshold use it
    instead of the lognormal's closed form where it is given: real gradients are often not
    lognormal (a Gaussian-like tensor's ``ln|x|`` is skewed), and the closed form then misses
    the requested sparsity by a factor of two or more. Empty: only the lognormal is known.
    """

    max_abs: float = math.inf
    sample: tuple[float, ...] = ()


def check_plan_numel(numel: int | None) -> int | None:
    """Validate the ``numel`` argument of :meth:`Codec.plan`: ``None`` or a non-negative int."""
    if numel is not None and (isinstance(numel, bool) or not isinstance(numel, int) or numel < 0):
        raise ValueError(f"plan: numel must be a non-negative int or None, got {numel!r}")
    return numel


def fit_or_none(x: torch.Tensor) -> ShardFit | None:
    """Lognormal fit of ``x`` with its largest finite ``|x|``; ``None`` when no entry is nonzero and finite."""
    try:
        f = lognormal.fit(x)
    except ValueError:
        return None
    flat = x.detach().reshape(-1)
    lo, hi = (float(v) for v in torch.aminmax(flat))  # NaN and inf propagate: then the masked max
    amax = max(-lo, hi)
    if not math.isfinite(amax):
        a = flat.abs()
        amax = float(torch.where(torch.isfinite(a), a, torch.zeros_like(a)).max())
    sub = flat[:: max(1, -(-flat.numel() // _SAMPLE_STRIDE_TARGET))].abs().to(torch.float64)
    sub = torch.sort(sub[torch.isfinite(sub) & (sub > 0)]).values
    if sub.numel() > SAMPLE_SIZE:
        sub = sub[torch.linspace(0, sub.numel() - 1, SAMPLE_SIZE, dtype=torch.float64).round().long()]
    return ShardFit(f.mu, f.sigma, f.count, amax, tuple(sub.cpu().tolist()))


def check_shard(x: torch.Tensor, what: str) -> torch.Tensor:
    """Validate an encoder input: a floating-point tensor; returned flat, float32, contiguous."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor")
    return x.reshape(-1).to(torch.float32).contiguous()


class Codec(abc.ABC):
    """A stateless compressor of 1-D float32 shards into self-describing uint8 payloads.

    Subclasses set ``tag``; ``summable`` codecs (dense float payloads) may be all-reduced
    directly instead of going through the two-phase exchange; ``stochastic`` codecs use the
    ``key`` given to :meth:`encode` (see :mod:`gradcomp.numerics.rng`) and are unbiased.
    """

    tag: ClassVar[CodecTag]
    summable: ClassVar[bool] = False
    stochastic: bool = False
    uses_fit: ClassVar[bool] = False

    def plan(self, fit: lognormal.LognormalFit | None, numel: int | None = None) -> Any:
        """Return what :meth:`encode` derives from a lognormal fit (cacheable between steps).

        ``fit`` is the fit of the shard's nonzero finite entries (``None``: it has none) and
        ``numel`` the shard's element count, so ``1 - fit.count / numel`` is its share of exact
        zeros (``numel=None``: taken as ``fit.count``, no exact zeros). The plan is valid for
        any shard of ``numel`` elements (encode re-checks whatever the data could violate).
        """
        return None

    def plan_segments(self, fits: Sequence[lognormal.LognormalFit | None], numels: Sequence[int]) -> list:
        """Plans for the segments of one shard, sent together as one SEGMENTS payload.

        ``fits[s]`` and ``numels[s]`` describe segment ``s`` as in :meth:`plan`. Default: each
        segment planned alone. A codec whose plans spend a shared resource (a bit budget)
        overrides this to divide it among the segments.
        """
        return [self.plan(f, n) for f, n in zip(fits, numels)]

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, *, key: int = 0, plan: Any = None) -> torch.Tensor:
        """Return the uint8 payload of ``x`` (flattened). ``plan=None`` derives it from ``x``."""

    def decode(self, payload: torch.Tensor, numel: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the float32 values of a payload of this codec (written into ``out`` when given).

        A payload of another layout raises ``ValueError``; :func:`gradcomp.codecs.decode_payload`
        decodes any payload. Validation and NaN poisoning as there.
        """
        header = read_header(payload)
        decoder = self.layout_decoder(header.tag)
        if decoder is None:
            raise ValueError(f"{type(self).__name__}.decode: a {header.tag.name} payload is not a layout "
                             "of this codec (gradcomp.codecs.decode_payload decodes any payload)")
        return decode_with(decoder, payload, header, numel, out)

    def layout_decoder(self, tag: CodecTag) -> Decoder | None:
        """The function that decodes this codec's payloads of layout ``tag`` (``None``: not one of its layouts)."""
        return None

    def wire_bytes(self, numel: int) -> int | None:
        """Exact payload size for ``numel`` elements, or ``None`` when it depends on the data."""
        return None

    def expected_wire_bytes(self, numel: int, fit: lognormal.LognormalFit | None = None) -> float:
        """Expected payload bytes for ``numel`` elements whose usable entries follow ``fit``.

        Fixed-size codecs: exactly :meth:`wire_bytes`. Codecs with data-dependent sizes
        override this with their model (what the hook's cost model and the benchmarks use).
        """
        fixed = self.wire_bytes(numel)
        if fixed is None:
            raise NotImplementedError(f"{type(self).__name__}: a codec with data-dependent payload sizes "
                                      "must define expected_wire_bytes")
        return float(fixed)

    def reduce_codec(self) -> Codec:
        """Codec for re-encoding a reduced (summed) shard in the second phase of an all-reduce."""
        return self

    def describe(self, plan: Any) -> dict:
        """Human/JSON-readable summary of a plan (format, sparsity, threshold)."""
        return {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


Decoder = Callable[[torch.Tensor, Header, int, torch.Tensor], None]  # (payload, header, numel, out)


def decode_with(decoder: Decoder, payload: torch.Tensor, header: Header, numel: int,
                out: torch.Tensor | None) -> torch.Tensor:
    """Run ``decoder`` on ``payload`` into ``out`` (or a new float32 tensor), then NaN-poison it
    if the header is flagged non-finite. ``numel`` must be a non-negative int (``ValueError``)."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    result = prepare_out(numel, out, payload.device)
    decoder(payload, header, numel, result)
    return nan_fill_if(header.nonfinite, result)


def nan_fill_if(flag_nonfinite: bool, out: torch.Tensor) -> torch.Tensor:
    """Poison a decoded shard: a non-finite input anywhere makes the whole shard NaN."""
    if flag_nonfinite:
        out.fill_(float("nan"))
    return out


def prepare_out(numel: int, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    if out.numel() != numel:
        raise ValueError(f"decode: out has {out.numel()} elements, payload holds {numel}")
    return out
