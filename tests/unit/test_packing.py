import pytest
import torch

from gradcomp import pack, packed_size, unpack

# (bits, codes, expected bytes written by hand: code i at stream bits [i*bits, (i+1)*bits),
# LSB first).
LITERALS = [
    (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b00000001]),
    (2, [0b01, 0b10, 0b11, 0b00, 0b11], [0b00111001, 0b00000011]),
    (3, [0b101, 0b011], [0b00011101]),
    (3, [0b111, 0b000, 0b101], [0b01000111, 0b00000001]),
    (4, [0xA, 0x5, 0xF], [0x5A, 0x0F]),
    (5, [0b10101, 0b00111], [0b11110101, 0b00000000]),
    (6, [0b110011, 0b101010, 0b000111, 0b111111], [0b10110011, 0b01111010, 0b11111100]),
    (7, [0b1111111, 0b0000001], [0b11111111, 0b00000000]),
    (8, [0x12, 0xFE], [0x12, 0xFE]),
    (9, [0b100000001, 0b011111111], [0b00000001, 0b11111111, 0b00000001]),
    (12, [0xABC, 0x123], [0xBC, 0x3A, 0x12]),
    (13, [0x1FFF], [0xFF, 0x1F]),
    (16, [0x1234, 0xFFFF], [0x34, 0x12, 0xFF, 0xFF]),
]


@pytest.mark.parametrize("bits,codes,expected", LITERALS)
def test_pack_matches_literals(bits, codes, expected):
    packed = pack(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


def _bitplane_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reference: expand to a bit stream, regroup into bytes."""
    c = codes.to(torch.int64).reshape(-1)
    stream = ((c[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)
    return (stream << torch.arange(8)).sum(1).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_width(bits, gen):
    for n in [0, 1, 2, 7, 8, 9, 31, 1000, 4099]:
        codes = torch.randint(0, 2**bits, (n,), generator=gen)
        packed = pack(codes, bits)
        assert packed.numel() == packed_size(n, bits) == (n * bits + 7) // 8
        assert torch.equal(packed, _bitplane_pack(codes, bits))
        out = unpack(packed, bits, n)
        assert out.dtype == (torch.uint8 if bits <= 8 else torch.int32)
        assert torch.equal(out.to(torch.int64), codes)


def test_pack_accepts_code_dtypes():
    for dtype in [torch.uint8, torch.int16, torch.int32, torch.int64]:
        assert pack(torch.tensor([1, 2, 3], dtype=dtype), 2).tolist() == [0b111001]
    # Multi-dimensional codes are packed in row-major order.
    assert pack(torch.tensor([[1, 2], [3, 0]]), 2).tolist() == [0b00111001]


def test_pack_errors():
    with pytest.raises(ValueError, match="bits must be an int in 1..16"):
        pack(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="codes must be in 0..7"):
        pack(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="codes must be in 0..7"):
        pack(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="need 2 bytes, got 3"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack(torch.zeros(3, dtype=torch.int32), 8, 3)
