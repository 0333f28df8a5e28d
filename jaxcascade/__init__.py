"""jaxcascade: the cascaded 3D CNN of Valverde et al. 2017 for MS lesion segmentation, in JAX."""

from jaxcascade.version import __version__  # noqa: F401

# Before anything can start a JAX backend: malloc settings for XLA:CPU's temporaries (glibc
# otherwise maps and page-faults large buffers on every call, 1.5-2x slower), the persistent
# compilation cache and, with forced host devices, XLA's collective timeouts. They must precede the backend, so importing jaxcascade applies them; set
# JAXCASCADE_MALLOC=0 and JAXCASCADE_COMPILATION_CACHE=0 to leave the process alone (see runtime).
from jaxcascade import runtime as _runtime  # noqa: E402

_runtime.configure()

__all__ = ["train", "segment", "segment_study", "load_model", "evaluate", "shipped_models", "detect_changes",
           "change_study"]


def __getattr__(name: str):
    # The public API (jaxcascade/api.py) imports JAX and Flax: loaded on first use, so that
    # `import jaxcascade` and `jaxcascade --help` stay quick.
    if name in __all__:
        from jaxcascade import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxcascade' has no attribute {name!r}")
