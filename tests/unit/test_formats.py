import math

import pytest

from gradcomp import FPFormat


@pytest.mark.parametrize("e,m,name,mx,mn,ms", [
    (3, 2, "float6_e3m2fn", 28.0, 0.25, 0.0625),
    (2, 3, "float6_e2m3fn", 7.5, 1.0, 0.125),
    (2, 1, "float4_e2m1fn", 6.0, 1.0, 0.5),
    (4, 3, "float8_e4m3fn", 480.0, 2**-6, 2**-9),
    (5, 2, "float8_e5m2fn", 114688.0, 2**-14, 2**-16),
    (1, 0, "float2_e1m0fn", 2.0, 2.0, 2.0),
])
def test_derived_properties(e, m, name, mx, mn, ms):
    f = FPFormat(e, m)
    assert (f.name, f.bits, f.max, f.min_normal, f.min_subnormal) == (name, 1 + e + m, mx, mn, ms)
    assert f.bias == 2 ** (e - 1) - 1
    assert f.code_values()[-1] == f.max and f.code_values()[1] == f.min_subnormal


def test_properties_follow_bias():
    f = FPFormat(4, 3, bias=8)
    assert f.name == "float8_e4m3fn_b8"
    assert f.max == 240.0 and f.min_subnormal == 2**-10
    assert FPFormat.from_name("float8_e4m3fn_b8") == f


@pytest.mark.parametrize("text", ["e3m2", "float6_e3m2fn", "E3M2", " float6_e3m2fn "])
def test_from_name(text):
    assert FPFormat.from_name(text) == FPFormat(3, 2)


@pytest.mark.parametrize("text,msg", [
    ("float8_e5m2", "finite-only"),
    ("float7_e3m2fn", "does not match"),
    ("fp6", "cannot parse"),
    ("e9m2", "exp_bits must be in 1..8"),
])
def test_from_name_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        FPFormat.from_name(text)


@pytest.mark.parametrize("args,msg", [
    ((0, 2), "exp_bits must be in 1..8"),
    ((9, 2), "exp_bits must be in 1..8"),
    ((3, 11), "man_bits must be in 0..10"),
    ((3, -1), "man_bits must be in 0..10"),
    ((6, 10), "at most 16"),
    ((8, 7), "beyond float32"),
    ((3.0, 2), "must be an int"),
    ((True, 2), "must be an int"),
])
def test_invalid_formats(args, msg):
    with pytest.raises(ValueError, match=msg):
        FPFormat(*args)


def test_invalid_bias():
    with pytest.raises(ValueError, match="below float32"):
        FPFormat(4, 3, bias=200)
    with pytest.raises(ValueError, match="bias must be an int"):
        FPFormat(4, 3, bias=1.5)


def test_formats_are_hashable_values():
    assert len({FPFormat(3, 2), FPFormat(3, 2, bias=3), FPFormat.from_name("e3m2")}) == 1
    assert math.isclose(FPFormat(8, 7, bias=128).max, (2 - 2**-7) * 2**127)
