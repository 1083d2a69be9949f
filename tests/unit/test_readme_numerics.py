"""The README's numerics-core example runs as written, and its fused path is the two-call one."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _numerics_block() -> str:
    text = README.read_text()
    section = text[text.index("## The numerics core"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under 'The numerics core'"
    return match.group(1)


def test_readme_numerics_example_runs():
    import gradcomp

    scope: dict = {}
    exec(compile(_numerics_block(), "README.md (numerics core)", "exec"), scope)
    x, fmt, wire, x_back = scope["x"], scope["fmt"], scope["wire"], scope["x_back"]
    assert wire.dtype == torch.uint8 and wire.numel() == (x.numel() * fmt.bits + 7) // 8
    two_call = gradcomp.pack(gradcomp.encode(x, fmt, "stochastic", key=7), fmt.bits)
    assert torch.equal(wire, two_call)
    assert torch.equal(x_back, gradcomp.decode(gradcomp.unpack(wire, fmt.bits, x.numel()), fmt))
