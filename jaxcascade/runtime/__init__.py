"""What every stage leans on: process-wide settings (here), devices and processes (`distributed`), random
streams (`seeding`), and output paths checked before work and files written atomically (`outputs`).
May import `jaxcascade.errors` only.

The settings are made when jaxcascade is imported, before any JAX backend exists:

**malloc.** XLA:CPU takes each call's temporary buffers from glibc malloc.
Above malloc's mmap threshold, and in every worker thread's own arena (capped
at 64 MiB), a large buffer is a fresh `mmap`: every call then page-faults and
the kernel zeroes tens of MB afresh, which made the dense kernel 2-8x slower
on some machines. Three `mallopt` calls keep those buffers in one heap that is
reused: one arena, no mmap below 1 GiB, no trimming. They only take effect
before the CPU backend starts its threads (after `import jax` is fine; after
the first computation they silently do nothing), so they are made at import;
the cost is a heap that stays at its high-water mark (+70-380 MB RSS).
Opt out with JAXCASCADE_MALLOC=0, or set the same through
GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647
at launch.

**Collectives.** With forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N),
XLA:CPU's 40 s limit on gathering a collective is raised (COLLECTIVE_FLAGS): the forced devices share the
cores, and a loaded machine could end a multi-device run there.

**Compilation cache.** Every `segment` and `train` would otherwise compile
the same functions afresh. JAX's persistent cache keeps them in a per-user
folder, one subfolder per CPU model and JAX version (an executable built for
one CPU's instruction set must not load on another). It is size-limited,
which makes JAX guard every read and write with a file lock, so processes can
share it. JAXCASCADE_COMPILATION_CACHE=0 disables it, =PATH moves it; an
explicit JAX_COMPILATION_CACHE_DIR (or jax config) wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

MALLOC_ENV = "JAXCASCADE_MALLOC"
CACHE_ENV = "JAXCASCADE_COMPILATION_CACHE"
_CACHE_SET_ENV = "JAXCASCADE_SET_JAX_CACHE_DIR"  # the JAX_COMPILATION_CACHE_DIR that jaxcascade set
_OFF = ("0", "off", "false", "no")

# glibc's mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1))
# The same settings as glibc reads them from the environment at a process's start (for processes that
# do not import jaxcascade, e.g. the benchmarks' PyTorch baselines).
GLIBC_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for name, (_, value) in
                          zip(("arena_max", "mmap_threshold", "trim_threshold"), MALLOC_SETTINGS))
CACHE_MAX_BYTES = 2 * 2**30
# Below this compile time JAX would not bother to cache; the CPU compiles that
# dominate start-up (the train step, the dense kernel) take 0.3-3 s each.
CACHE_MIN_COMPILE_SECONDS = 0.2

STATUS: dict[str, str] = {}

# The address space JAX, XLA and their thread pools need to start and segment a small image (measured on
# a 2-core AMD EPYC: 1.2 GB segments a 2 mm phantom; under about 850 MB XLA's threads cannot be created,
# and C++ aborts the process or a library fails to load with a traceback, neither of which Python can
# turn into one line). A limit below this is refused before anything heavy is imported.
MIN_ADDRESS_SPACE_BYTES = 1 << 30


def address_space_problem(limits=None) -> str | None:
    """Why this process's address-space limit (`ulimit -v`, RLIMIT_AS) is too small to run, or None.

    `limits` is (soft, hard) as `resource.getrlimit` gives them; read from the process when None.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if limits is None else limits
    if soft == resource.RLIM_INFINITY or soft >= MIN_ADDRESS_SPACE_BYTES:
        return None
    return (f"the address-space limit (ulimit -v) is {soft / 2**20:.0f} MiB, below the "
            f"{MIN_ADDRESS_SPACE_BYTES / 2**20:.0f} MiB that JAX and XLA need to start; raise it (ulimit -v "
            f"{MIN_ADDRESS_SPACE_BYTES // 1024} or more, or unlimited) and run the command again")


def _warn(message: str) -> None:
    from jaxcascade.errors import JaxcascadeWarning

    warnings.warn(message, JaxcascadeWarning, stacklevel=3)


def backend_started() -> bool:
    """Whether a JAX backend already exists in this process (without creating one)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without this private module: assume the worst
        return True
    probe = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(probe()) if probe else bool(getattr(xla_bridge, "_backends", True))


def configure_malloc() -> str:
    """Apply MALLOC_SETTINGS with mallopt; returns what happened ('applied', 'disabled', ...)."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() in _OFF:
        return "disabled"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    if backend_started():
        _warn("the JAX backend started before jaxcascade was imported, so its malloc settings come too late "
              "(large CPU buffers will page-fault on every call); import jaxcascade first, or launch with "
              "GLIBC_TUNABLES (see jaxcascade/runtime/__init__.py)")
        return "too late"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    failed = [param for param, value in MALLOC_SETTINGS if libc.mallopt(param, value) != 1]
    if failed:
        _warn(f"mallopt refused parameters {failed}; large CPU buffers may page-fault on every call")
        return "refused"
    return "applied"


def machine_tag() -> str:
    """A short name for this CPU model and instruction set, and the JAX version."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = platform.processor()
    # The first processor's model and flags describe them all on one machine.
    lines = [line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags", "Features"))][:2]
    try:
        from importlib.metadata import version

        jax_version = version("jaxlib")
    except Exception:  # noqa: BLE001 - no metadata: the tag still separates CPUs
        jax_version = "unknown"
    digest = hashlib.sha256("\n".join([platform.machine(), jax_version, *lines]).encode()).hexdigest()[:12]
    return f"{platform.machine()}-jaxlib{jax_version}-{digest}"


def cache_root() -> Path:
    """jaxcascade's per-user cache folder (compiled functions, built kernels).

    $XDG_CACHE_HOME/jaxcascade, or ~/.cache/jaxcascade; a relative XDG_CACHE_HOME is ignored, as the XDG
    specification asks (what is loaded from the cache must not depend on the working directory).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "jaxcascade"


def default_cache_dir() -> Path:
    return cache_root() / "xla" / machine_tag()


def configure_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache in the per-user folder; returns the folder or why not.

    Before jax is imported this sets the environment variables jax reads at its import, so that importing
    jaxcascade imports no jax (a command that fails on its arguments answers at once, ~0.1 s rather than
    2-5 s); after, it updates jax's config. A child process inherits the variables: _CACHE_SET_ENV marks
    them as jaxcascade's own, so that only a user's JAX_COMPILATION_CACHE_DIR counts as explicit.
    """
    ours = os.environ.get(_CACHE_SET_ENV)
    if ours and os.environ.get("JAX_COMPILATION_CACHE_DIR") == ours and "jax" not in sys.modules:
        del os.environ["JAX_COMPILATION_CACHE_DIR"]  # a parent's choice, made afresh here (or disabled)
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in _OFF:
        return "disabled"
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") and os.environ["JAX_COMPILATION_CACHE_DIR"] != ours:
        return f"{os.environ['JAX_COMPILATION_CACHE_DIR']} (JAX_COMPILATION_CACHE_DIR)"
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_compilation_cache_dir and jax.config.jax_compilation_cache_dir != ours:
        return f"{jax.config.jax_compilation_cache_dir} (jax config)"
    try:
        import filelock  # noqa: F401 - JAX's size-limited cache locks with it
    except ImportError:
        return "no filelock package: not shared safely, left off"
    folder = Path(setting) if setting else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _warn(f"{folder}: cannot create the compilation cache ({error.strerror}); compiling afresh each run")
        return "unwritable"
    min_seconds = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(CACHE_MIN_COMPILE_SECONDS))
    if jax is None:
        os.environ.update({"JAX_COMPILATION_CACHE_DIR": str(folder), _CACHE_SET_ENV: str(folder),
                           "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES),
                           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": min_seconds})
        return str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))
    os.environ[_CACHE_SET_ENV] = str(folder)
    return str(folder)


# XLA:CPU ends a process whose collective (an all-reduce of the devices' gradients) has not gathered every
# device within 40 s, its "termination timeout". Forced host devices (--xla_force_host_platform_device_count)
# are threads that share the cores, and on a loaded machine one of them can be kept waiting that long: a
# 4-device run on 2 busy cores was ended that way. Where devices are forced and these timeouts are not set,
# they are raised to what a starved thread may need; a user's own values stay.
COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
                    "--xla_cpu_collective_call_terminate_timeout_seconds=900")


def configure_collectives() -> str:
    """Longer collective timeouts for forced host devices (see COLLECTIVE_FLAGS), before XLA reads its flags."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        return "XLA's defaults (no forced host devices)"
    if "collective_call_terminate_timeout" in flags or "collective_call_warn_stuck_timeout" in flags:
        return "as XLA_FLAGS sets them"
    os.environ["XLA_FLAGS"] = " ".join([flags.strip(), *COLLECTIVE_FLAGS])
    return "raised for forced host devices (warn 120 s, end 900 s)"


def configure() -> dict[str, str]:
    """The settings, once per process; STATUS records what each did."""
    if not STATUS:
        STATUS["malloc"] = configure_malloc()
        STATUS["compilation_cache"] = configure_compilation_cache()
        STATUS["collectives"] = configure_collectives()
    return STATUS
