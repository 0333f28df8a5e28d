"""jaxcascade: the cascaded 3D CNN of Valverde et al. 2017 for MS lesion segmentation, in JAX."""

__version__ = "0.1.0"

# Before anything can start a JAX backend: malloc settings for XLA:CPU's
# temporaries and the persistent compilation cache (see runtime.py).
from jaxcascade import runtime as _runtime  # noqa: E402

_runtime.configure()
