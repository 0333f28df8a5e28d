"""What this machine gets from jaxcascade's C++ CPU kernels, and why (`jaxcascade doctor`, and the note a long
job logs when it runs without them)."""

from __future__ import annotations

import platform
import warnings

from jaxcascade.ops import kernel_target

# The flags that decide the variant (kernel_target.native_isa), as /proc/cpuinfo names them.
_DECIDING_FLAGS = ("avx512f", "avx2", "fma", "asimd")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_report() -> dict:
    """The CPU's class and flags, the kernels' variant, whether they are built, loaded and used here, and why
    not; the JAX version and devices. Builds the kernels where they would be used (as a first run would)."""
    import jax

    from jaxcascade.ops import kernel_build

    flags = kernel_target.cpu_flags()
    choice = kernel_target.this_machine()
    native = kernel_target.native_isa(platform.machine(), flags)
    report = {"cpu": cpu_model(), "machine": platform.machine(), "cpu_class": kernel_target.cpu_class(native),
              "cpu_flags": [flag for flag in _DECIDING_FLAGS if flag in flags], "variant": choice.isa,
              "wanted": choice.use, "reason": choice.reason, "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": [str(device) for device in jax.devices()]}
    try:
        report["compiler"] = " ".join(kernel_build.compiler())
    except kernel_build.KernelUnavailable as error:
        report["compiler"] = f"none: {error}"
    try:
        folder = kernel_build.kernel_dir()
        report["library"] = str(folder / kernel_build.LIBRARY)
        report["built"] = kernel_build.verified(folder) is not None
    except (kernel_build.KernelUnavailable, OSError) as error:
        report["library"], report["built"] = f"none: {error}", False
    report["used"] = False
    if choice.use:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report["used"] = kernel_build.available()
        if not report["used"]:
            report["reason"] = "; ".join(str(w.message) for w in caught) or "the kernels could not be loaded"
        report["built"] = report["built"] or report["used"]
    if report["backend"] != "cpu":
        report["reason"] += f" (JAX computes on {report['backend']} here: the CPU kernels matter only on CPU)"
    return report


def describe(report: dict) -> str:
    """`kernel_report` as the lines `jaxcascade doctor` prints."""
    flags = ", ".join(report["cpu_flags"]) or "none of " + ", ".join(_DECIDING_FLAGS)
    return (f"CPU: {report['cpu']} ({report['machine']}), class {report['cpu_class']} (flags found: {flags})\n"
            f"C++ kernels: {report['variant']} variant; built: {'yes' if report['built'] else 'no'} "
            f"({report['library']}); used: {'yes' if report['used'] else 'no'}: {report['reason']}\n"
            f"compiler: {report['compiler']}\n"
            f"JAX {report['jax']}, backend {report['backend']}, devices: {', '.join(report['devices'])}")


def _cpu_only() -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend (a multi-host job must call
    jax.distributed.initialize before any backend starts): JAX_PLATFORMS if set, else no accelerator plugin
    installed (PJRT plugins register under the `jax_plugins` entry points; TPUs come with libtpu)."""
    import importlib.metadata
    import importlib.util
    import os

    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None


def without_kernels_note() -> str | None:
    """One line for a long job computing on the CPU without the kernels (why, and where to look); None when
    they are used or JAX may compute elsewhere. Builds them where they would be used, as the job would, and
    starts no JAX backend."""
    from jaxcascade.ops import kernel_build

    if not _cpu_only():
        return None
    choice = kernel_target.this_machine()
    if choice.use and kernel_build.available():
        return None
    why = choice.reason if not choice.use else "they could not be built or loaded (the warning above says why)"
    return f"computing on the CPU without jaxcascade's C++ kernels: {why}; `jaxcascade doctor` says more"
