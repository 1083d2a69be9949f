"""DDP training with the hook ends within 1 point of uncompressed training (SPEC 6 data)."""

import pytest

from gradcomp.codecs import FPCodec, PruneFPCodec

from . import cases
from .harness import spawn


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_training_matches_uncompressed(world, tmp_path):
    runs = [
        ("fp32", None, {}),
        ("fp6", FPCodec(6), {}),
        ("prune_fp", PruneFPCodec(0.85, 6), {}),
    ]
    accs = spawn(world, cases.train_digits, tmp_path, runs, 12)[0]
    assert accs["fp32"] > 0.93, accs  # the baseline itself learned the task
    for name in ("fp6", "prune_fp"):
        assert accs[name] >= accs["fp32"] - 0.01, (world, accs)
    assert accs["fp6_bits_per_element"] <= 6.2
    assert accs["prune_fp_bits_per_element"] <= 3.0, accs
