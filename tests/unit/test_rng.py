import pytest
import torch

from gradcomp.numerics import rng


def test_golden_values():
    # Pinned outputs: a platform whose int32 arithmetic does not wrap, or a change of the
    # mixer, would silently change every stochastic result; this catches it.
    assert rng.random_bits(4, 0).tolist() == [0, 33350994, 83415710, 260840893]
    assert rng.derive_key(0, 1, 2, 3) == rng.derive_key(0, 1, 2, 3)
    assert rng.derive_key(0, 1, 2, 3) != rng.derive_key(0, 1, 2, 4)
    assert 0 <= rng.derive_key(2**70, -5) < 2**63


def test_bits_are_uniform_and_key_dependent():
    b = rng.random_bits(1 << 18, rng.derive_key(9))
    per_bit = torch.stack([(b >> i) & 1 for i in range(32)]).double().mean(1)
    # 2**18 fair bits: standard error 0.001 each.
    assert ((per_bit - 0.5).abs() < 0.005).all()
    assert not torch.equal(b, rng.random_bits(1 << 20, rng.derive_key(10)))
    u = rng.uniform(1 << 20, 123)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.002


def test_key_validation():
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        rng.resolve_key(None, None, "op")
    with pytest.raises(ValueError, match="key must be an int"):
        rng.resolve_key(None, -1, "op")
    with pytest.raises(ValueError, match="takes ints"):
        rng.derive_key(1.5)
    g = torch.Generator().manual_seed(0)
    assert rng.resolve_key(g, None, "op") != rng.resolve_key(g, None, "op")
