"""jaxcascade: the cascaded 3D CNN of Valverde et al. 2017 for MS lesion segmentation, in JAX."""

__version__ = "0.1.0"
