"""Low-precision training modules: neural-gradient quantization (:class:`GradQuant`) and
Squeeze-and-Threshold activation quantization (:class:`SqueezeThreshold`)."""

from gradcomp.nn.gradquant import GradQuant, convert_gradquant
from gradcomp.nn.st import SqueezeThreshold, convert_st

__all__ = ["GradQuant", "convert_gradquant", "SqueezeThreshold", "convert_st"]
