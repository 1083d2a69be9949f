"""Dense bit packing of integer codes: ``bits`` bits per code, any width 1..16.

Layout (little-endian bit order): code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``,
least significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. The last
byte's unused high bits are zero. So ``pack([0b101, 0b011], 3)`` is the one byte ``0b00011101``.

The kernels are vectorized over groups of ``g = 8 / gcd(bits, 8)`` codes, which fill exactly
``bits * g / 8`` bytes; the Python loops run over the few (code, byte) pairs of one group (fixed
per width), never over elements.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from gradcomp.numerics import kernels

MIN_BITS, MAX_BITS = 1, 16


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits pack into: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


@cache
def _group_plan(bits: int) -> tuple[int, int, tuple[tuple[int, int, int], ...]]:
    """Return (codes per group, bytes per group, ((code j, byte k, shift), ...)).

    ``shift = 8k - j*bits`` is how far code j's bits sit below byte k's first bit: byte k gets
    ``code_j >> shift`` (or ``<< -shift``), masked to 8 bits.
    """
    group = 8 // math.gcd(bits, 8)
    nbytes = bits * group // 8
    terms = []
    for j in range(group):
        first, last = j * bits, (j + 1) * bits - 1
        for k in range(first // 8, last // 8 + 1):
            terms.append((j, k, 8 * k - first))
    return group, nbytes, tuple(terms)


def _shift(v: torch.Tensor, s: int) -> torch.Tensor:
    return v >> s if s >= 0 else v << -s


def pack_unchecked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack` without validating code values (for hot paths whose codes are in range)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    fast = kernels.pack_codes(flat, bits) if n else None
    if fast is not None and fast[1]:  # the native kernel (uint8/int32 CPU codes): the same bytes
        return fast[0]
    if bits == 8:
        return flat.to(torch.uint8)
    group, nbytes, terms = _group_plan(bits)
    ngroups = -(-n // group)
    c = flat.to(torch.int32)
    if ngroups * group != n:
        c = torch.cat([c, c.new_zeros(ngroups * group - n)])
    c = c.view(ngroups, group)
    out = torch.zeros(ngroups, nbytes, dtype=torch.int32, device=codes.device)
    for j, k, s in terms:
        out[:, k] |= _shift(c[:, j], s) & 0xFF
    return out.to(torch.uint8).view(-1)[: packed_size(n, bits)]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (each in ``0 .. 2**bits - 1``) into ``ceil(numel*bits/8)`` bytes.

    Returns a 1-D uint8 tensor on ``codes``' device; see the module docstring for the layout.

    Example:
        >>> pack(torch.tensor([0b101, 0b011]), 3).tolist() == [0b00011101]
        True
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
            or codes.dtype == torch.bool:
        raise ValueError("pack: expected an integer tensor of codes")
    fast = kernels.pack_codes(codes.reshape(-1), bits) if codes.numel() else None
    if fast is not None and fast[1]:  # packed and range-checked in one native pass
        return fast[0]
    if codes.numel() and bool(((codes < 0) | (codes.to(torch.int64) >= 2**bits)).any()):
        raise ValueError(f"pack: codes must be in 0..{2**bits - 1} for bits={bits}")
    return pack_unchecked(codes, bits)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Invert :func:`pack`: return ``numel`` codes (uint8 for bits <= 8, else int32), 1-D.

    ``packed`` must be a 1-D uint8 tensor of exactly ``ceil(numel*bits/8)`` bytes.
    """
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"unpack: numel must be a non-negative int, got {numel!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("unpack: expected a 1-D uint8 tensor")
    expected = packed_size(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"unpack: {numel} codes of {bits} bits need {expected} bytes, got {packed.numel()}"
        )
    out_dtype = torch.uint8 if bits <= 8 else torch.int32
    fast = kernels.unpack_codes(packed, bits, numel) if numel else None
    if fast is not None:  # the native kernel: the same codes
        return fast
    if bits == 8:
        return packed.clone()
    group, nbytes, terms = _group_plan(bits)
    ngroups = -(-numel // group)
    p = packed.to(torch.int32)
    if ngroups * nbytes != expected:
        p = torch.cat([p, p.new_zeros(ngroups * nbytes - expected)])
    p = p.view(ngroups, nbytes)
    c = torch.zeros(ngroups, group, dtype=torch.int32, device=packed.device)
    for j, k, s in terms:
        c[:, j] |= _shift(p[:, k], -s)
    c &= (1 << bits) - 1
    return c.view(-1)[:numel].to(out_dtype)
