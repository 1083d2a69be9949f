"""Counter-based random bits for stochastic rounding and pruning.

gradcomp never draws from torch's global RNG. A stochastic operation takes a 63-bit ``key``
(drawn once from a ``torch.Generator``, or derived from integers such as (seed, step, bucket,
rank) with :func:`derive_key`), and element ``i`` of a tensor gets the 32 random bits
``hash32(i, key)``. Because the bits are a pure function of (index, key):

* results are identical on CPU and CUDA and between eager and compiled kernels;
* every element's bits are exactly uniform over keys (the hash is a bijection of a word that
  the key offsets uniformly), which is what makes stochastic rounding exactly unbiased;
* no noise tensor is materialized, so the draw can be fused into the encode kernel.

The mixer is Chris Wellons' ``lowbias32`` applied to ``i * 0x9E3779B9 + k0`` xor ``k1``, where
``k0, k1`` are the low and high 32 bits of the key. All arithmetic is on int32 tensors with
wrap-around multiplication (what CPU and CUDA integer units do).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
KEY_BITS = 63


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """Mix integers into a 63-bit key (splitmix64 chain), e.g. ``derive_key(seed, step, bucket, rank)``.

    The formula: ``h = 0; for p in parts: h = splitmix64(h ^ (p mod 2**64)); key = h >> 1``.
    Distinct tuples give independent-looking keys; the same tuple always gives the same key.

    Example:
        >>> derive_key(0, 1, 2, 3) == derive_key(0, 1, 2, 3) != derive_key(0, 1, 2, 4)
        True
    """
    h = 0
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            raise ValueError(f"derive_key takes ints, got {p!r}")
        h = _splitmix64(h ^ (p & _MASK64))
    return h >> 1


def key_from_generator(generator: torch.Generator) -> int:
    """Draw one 63-bit key from ``generator`` (advances it by one draw)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"expected a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**62, (2,), generator=generator, device=generator.device,
                             dtype=torch.int64).sum())


def resolve_key(generator: torch.Generator | None, key: int | None, what: str) -> int:
    """Return the key for a stochastic operation from exactly one of ``generator`` / ``key``."""
    if generator is not None and key is not None:
        raise ValueError(f"{what}: pass either generator or key, not both")
    if key is not None:
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**KEY_BITS:
            raise ValueError(f"{what}: key must be an int in [0, 2**{KEY_BITS}), got {key!r}")
        return key
    if generator is None:
        raise ValueError(
            f"{what}: stochastic mode needs a torch.Generator (or key=); gradcomp never draws "
            "from the global RNG, so results are reproducible"
        )
    return key_from_generator(generator)


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # Logical right shifts on int32: arithmetic shift, then mask off the sign-extended bits.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def hash_bits(index: torch.Tensor, key: int) -> torch.Tensor:
    """Return 32 random bits per element of the int32 ``index`` tensor, as int32."""
    k0, k1 = _signed32(key), _signed32(key >> 32)
    x = index * _signed32(0x9E3779B9) + k0
    return _lowbias32(x ^ k1)


def random_bits(numel: int, key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return ``hash_bits(arange(numel), key)``: 32 random bits per element as int32."""
    if numel >= 2**31:
        raise ValueError(f"random_bits supports fewer than 2**31 elements, got {numel}")
    return hash_bits(torch.arange(numel, dtype=torch.int32, device=device), key)


def uniform(numel: int, key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return float32 uniforms on the open interval (0, 1): ``(top 24 bits + 0.5) / 2**24``."""
    bits = (random_bits(numel, key, device) >> 8) & 0xFFFFFF
    return (bits.to(torch.float32) + 0.5) * (1.0 / 2**24)
