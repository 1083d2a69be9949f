"""Low-precision training modules: neural-gradient quantization (:class:`GradQuant`)."""

from .gradquant import GradQuant, convert_gradquant

__all__ = ["GradQuant", "convert_gradquant"]
