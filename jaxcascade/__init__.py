"""jaxcascade: the cascaded 3D CNN of Valverde et al. 2017 for MS lesion segmentation, in JAX."""

__version__ = "0.1.0"

# Before anything can start a JAX backend: malloc settings for XLA:CPU's
# temporaries and the persistent compilation cache (see runtime.py).
from jaxcascade import runtime as _runtime  # noqa: E402

_runtime.configure()

__all__ = ["train", "segment", "segment_study", "load_model", "evaluate"]


def __getattr__(name: str):
    # The public API (jaxcascade/api.py) imports JAX and Flax: loaded on first use, so that
    # `import jaxcascade` and `jaxcascade --help` stay quick.
    if name in __all__:
        from jaxcascade import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxcascade' has no attribute {name!r}")
