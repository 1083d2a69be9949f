"""gradcomp: lognormal-fitted low-bit FP quantization and stochastic pruning of gradients.

DDP hook: :func:`register` / :class:`CompressionState` + :func:`compression_hook`, with the
codecs of :mod:`gradcomp.codecs` and the collectives of :mod:`gradcomp.comm.collectives`.

Numerics core: :class:`FPFormat`, :func:`quantize`, :func:`encode`, :func:`decode`,
:func:`pack`, :func:`unpack`, :func:`stochastic_prune`, and the :mod:`gradcomp.numerics.lognormal`
toolkit (fits, KS tests, pruning thresholds, optimal exponent/mantissa split).
"""

from gradcomp import codecs, nn
from gradcomp.comm import collectives
from gradcomp.comm.hook import CompressionState, compression_hook, register
from gradcomp.numerics import lognormal, rng
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.packing import pack, packed_size, unpack
from gradcomp.numerics.pruning import prune_to_sparsity, stochastic_prune
from gradcomp.numerics.quant import decode, decode_table, encode, has_nonfinite, quantize

__version__ = "0.1.0"

__all__ = [
    "CompressionState",
    "FPFormat",
    "codecs",
    "collectives",
    "compression_hook",
    "register",
    "decode",
    "decode_table",
    "encode",
    "has_nonfinite",
    "lognormal",
    "nn",
    "pack",
    "packed_size",
    "prune_to_sparsity",
    "quantize",
    "rng",
    "stochastic_prune",
    "unpack",
]
