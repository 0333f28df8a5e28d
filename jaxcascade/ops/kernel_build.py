"""Building, caching and loading jaxcascade's C++ CPU kernels (kernels/*.cc) for XLA's FFI.

The kernels are compiled once per machine with the system's C++ compiler (`c++`, or $CXX) for this
CPU's vector width (kernel_target.py: the AVX-512, AVX2, NEON or generic variant), against the FFI headers that ship inside jaxlib; nothing is downloaded. A home
folder shared by a cluster's nodes and containers, killed jobs and full disks are the normal case, so:

- the build folder is keyed by the CPU, jaxlib, the variant, the compiler (its path and `--version`), the whole
  command line and the sources: a change of any of them builds afresh, beside the old build;
- one process builds while the others wait on a lock file (`filelock`), into a unique temporary file
  renamed into place; a sha256 written after the build is checked before the library is loaded, so a
  truncated or corrupt file (a build killed mid-write, a full disk) is rebuilt once, never loaded;
- a failed build leaves a marker and the compiler's whole output (`build.log`) beside it: later processes
  warn once with the compiler's first `error:` line and do not retry; `jaxcascade build-kernels` does;
- a library is loaded only if it and every folder from the root down to it belong to this user (or root,
  or the owner of a JAXCASCADE_KERNEL_DIR) and no one else may write to them (a sticky folder aside), and
  what is loaded is the bytes checked, read through the checked descriptors, not the path again; folders
  in the user's cache are made owner-only (0o700);
- a node without a compiler loads the newest whole build for its CPU that is already there;
- the root is JAXCASCADE_KERNEL_DIR if set (e.g. a prebuilt folder shared on a cluster whose compute
  nodes have no compiler: `jaxcascade build-kernels` on a login node of the same CPU fills it), else the
  `kernels` folder of jaxcascade's cache (`runtime.cache_root`); a relative path is ignored, since the
  library loaded would then depend on the working directory.

Where the kernels cannot be used, jaxcascade warns once and uses XLA's GEMM formulations (about 2x
slower on CPU); JAXCASCADE_CPU_KERNEL=0 chooses them and silences the warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

from jaxcascade import runtime
from jaxcascade.errors import JaxcascadeWarning, UserError
from jaxcascade.ops import kernel_target
from jaxcascade.ops.kernel_target import ISA_ENV, KERNEL_ENV  # noqa: F401  (re-exported)
from jaxcascade.runtime.outputs import write_text

KERNEL_DIR_ENV = "JAXCASCADE_KERNEL_DIR"
KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(KERNELS / name for name in ("conv3d.cc", "dense_head.cc", "max_pool.cc",
                                             "nicms_features.cc"))  # + parallel.h, simd.h
TARGET = "jaxcascade_conv3d"
WHERE_TARGET = "jaxcascade_conv3d_where"
GRADIENT_TARGET = "jaxcascade_conv3d_kernel_gradient"
HEAD_TARGET = "jaxcascade_dense_head"
HEAD_WHERE_TARGET = "jaxcascade_dense_head_where"
POOL_TARGET = "jaxcascade_max_pool"
NICMS_TARGET = "jaxcascade_nicms_features"
# XLA custom-call target -> the handler symbol the library exports (XLA_FFI_DEFINE_HANDLER_SYMBOL).
HANDLERS = {TARGET: "JaxcascadeConv3d", WHERE_TARGET: "JaxcascadeConv3dWhere",
            GRADIENT_TARGET: "JaxcascadeConv3dKernelGradient", HEAD_TARGET: "JaxcascadeDenseHead",
            HEAD_WHERE_TARGET: "JaxcascadeDenseHeadWhere", POOL_TARGET: "JaxcascadeMaxPool",
            NICMS_TARGET: "JaxcascadeNicmsFeatures"}
TARGETS = tuple(HANDLERS)
LIBRARY, CHECKSUM, FAILED, LOG, LOCK = "libjaxcascade.so", "libjaxcascade.so.sha256", "failed.json", "build.log", ".lock"
COMPILE_SECONDS, LOCK_SECONDS = 600, 900


class KernelUnavailable(Exception):
    """Why the kernels cannot be used here (one line)."""


def kernels_root() -> Path:
    """Where builds live: JAXCASCADE_KERNEL_DIR if absolute, else jaxcascade's cache's `kernels` folder."""
    setting = os.environ.get(KERNEL_DIR_ENV, "")
    if setting and os.path.isabs(setting):
        return Path(setting)
    return runtime.cache_root() / "kernels"


def compiler() -> tuple[str, str]:
    """(resolved path, first line of `--version`) of $CXX, or c++, or g++."""
    name = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    path = shutil.which(name) if name else None
    if path is None:
        raise KernelUnavailable(f"no C++ compiler ({name or 'c++'} not found; install one or set $CXX)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"{path} --version failed ({error})") from None
    return os.path.realpath(path), (version.strip().splitlines() or ["unknown"])[0]


def target_isa() -> str:
    """The variant to build and load here (kernel_target: the CPU's widest, or JAXCASCADE_CPU_KERNEL_ISA's)."""
    choice = kernel_target.this_machine()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced and (forced not in kernel_target.ISAS or
                   not kernel_target.runs_on(forced, platform.machine(), kernel_target.cpu_flags())):
        raise KernelUnavailable(choice.reason)
    return choice.isa


def _command(path: str, output: str, isa: str) -> list[str]:
    import jax

    return [path, "-O3", *kernel_target.compile_flags(isa, platform.machine()), "-std=c++17", "-shared", "-fPIC",
            "-w", f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", output]


def prebuilt(isa: str) -> Path | None:
    """The newest whole, trusted build of the variant for this CPU and jaxlib in the kernels' root, whatever
    compiler made it: what a node without a compiler loads (`jaxcascade build-kernels` filled the folder
    elsewhere)."""
    folders = sorted((kernels_root() / runtime.machine_tag()).glob(f"{isa}-*/" + LIBRARY),
                     key=lambda p: p.stat().st_mtime)
    for library in reversed(folders):
        with contextlib.suppress(KernelUnavailable, OSError):
            if verified(library.parent) is not None:
                return library.parent
    return None


def kernel_dir() -> Path:
    """This machine's build folder: CPU and jaxlib, then the variant (`target_isa`) and a key of compiler,
    command line and sources.

    Without a compiler: the newest whole build of the variant for this CPU already there (`prebuilt`), else
    why not.
    """
    isa = target_isa()
    try:
        path, version = compiler()
    except KernelUnavailable as error:
        folder = prebuilt(isa)
        if folder is None:
            raise KernelUnavailable(f"{error}, and no build for this CPU in {kernels_root()} ({isa} variant)") from None
        return folder
    key = hashlib.sha256()
    for part in (path, version, " ".join(_command(path, LIBRARY, isa))):
        key.update(part.encode() + b"\0")
    for source in sorted(KERNELS.iterdir()):
        if source.suffix in (".cc", ".h"):
            key.update(source.name.encode() + b"\0" + source.read_bytes())
    return kernels_root() / runtime.machine_tag() / f"{isa}-{key.hexdigest()[:16]}"


def _make_folders(folder: Path) -> None:
    """folder and the parents it needs: owner-only (0o700) in the user's cache, readable by all (0o755) in a
    JAXCASCADE_KERNEL_DIR, which exists to be shared."""
    mode = 0o755 if os.environ.get(KERNEL_DIR_ENV) else 0o700
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=mode)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refusal(name, info: os.stat_result, owners: set[int]) -> str | None:
    """Why a folder or file with this status must not be trusted, or None: it must belong to this user (or
    root, or the owner of JAXCASCADE_KERNEL_DIR, a folder shared on purpose) and be writable by no one else.
    A sticky folder (/tmp's 1777) lets others add entries but not rename or remove ours, and every entry on
    the way down is checked in turn, so it is accepted."""
    if info.st_uid not in owners:
        return f"{name} belongs to user {info.st_uid}, not to this user"
    sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_folder:
        return f"{name} is writable by other users"
    return None


def _open_below(folder_fd: int, name: str, shown: Path, library: Path, *, folder: bool = False) -> int:
    """name inside the folder of folder_fd, opened without following a symbolic link (refused: it could
    point anywhere, past the checks)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0)
    try:
        return os.open(name, flags, dir_fd=folder_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and \
                stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
            raise KernelUnavailable(f"refusing to load {library}: {shown} is a symbolic link") from None
        raise


def _read_trusted(library: Path) -> bytes | None:
    """The library's bytes, if it can be trusted and matches its checksum; None if it must be (re)built.

    Whoever may write a folder on the way to the library may swap what lies below it, so every folder from
    the kernels' root down is checked, each opened relative to the one checked before it and checked
    through its descriptor: what is read is what was checked, whatever happens to the paths meanwhile.
    Raises KernelUnavailable naming what others could have written.
    """
    root, folder = kernels_root(), library.parent
    top = root if folder.is_relative_to(root) else folder
    opened: list[int] = []

    def check(name, descriptor: int) -> None:
        reason = _refusal(name, os.fstat(descriptor), owners)
        if reason:
            raise KernelUnavailable(f"refusing to load {library}: {reason}")

    try:
        try:
            opened.append(os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))  # the root as configured
            owners = {os.getuid(), 0}
            if os.environ.get(KERNEL_DIR_ENV) and top == root:
                owners.add(os.fstat(opened[0]).st_uid)
            check(top, opened[0])
            path = top
            for part in folder.relative_to(top).parts:
                path = path / part
                opened.append(_open_below(opened[-1], part, path, library, folder=True))
                check(path, opened[-1])
            checksum_fd = _open_below(opened[-1], CHECKSUM, folder / CHECKSUM, library)
            with open(checksum_fd, "rb") as file:
                checksum = file.read().decode(errors="replace").strip()
            opened.append(_open_below(opened[-1], LIBRARY, library, library))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(os.fstat(opened[-1]).st_mode):
            return None
        check(library, opened[-1])
        with open(opened.pop(), "rb") as file:
            data = file.read()
        return data if hashlib.sha256(data).hexdigest() == checksum else None
    finally:
        for descriptor in opened:
            os.close(descriptor)


def verified(folder: Path) -> Path | None:
    """The folder's library if its checksum matches and it can be trusted; None if it must be (re)built."""
    return folder / LIBRARY if _read_trusted(folder / LIBRARY) is not None else None


def load(library: Path) -> ctypes.CDLL:
    """dlopen exactly the bytes that were checked (`_read_trusted`), never the path again: a file renamed
    over the library between the check and the load is not what runs.

    The bytes go to an anonymous memory file (memfd) loaded through /proc/self/fd; where that is not allowed
    (no memfd, vm.memfd_noexec, no /proc), to a private copy in a folder only this process knows (mkdtemp's
    0o700, created afresh, the file created exclusively).
    """
    data = _read_trusted(library)
    if data is None:
        raise KernelUnavailable(f"{library} no longer matches its checksum; `jaxcascade build-kernels` rebuilds it")
    with contextlib.suppress(AttributeError, OSError):
        descriptor = os.memfd_create(LIBRARY, os.MFD_CLOEXEC)
        try:
            with open(descriptor, "wb", closefd=False) as file:
                file.write(data)
            return ctypes.CDLL(f"/proc/self/fd/{descriptor}")
        finally:
            os.close(descriptor)
    with tempfile.TemporaryDirectory(prefix="jaxcascade-kernels-") as private:
        path = os.path.join(private, LIBRARY)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o700), "wb") as file:
            file.write(data)
        return ctypes.CDLL(path)  # mapped now: removing the copy leaves the loaded library whole


def first_error(output: str) -> str:
    """The compiler's first line that says what went wrong. collect2's closing summary ("ld returned 1
    exit status") says nothing; the linker's own line before it does (e.g. "No space left on device")."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("collect2:")]
    errors = [line for line in useful if re.search(r"\berror\b|\bfailed\b|No space left|Read-only", line)]
    return (errors or useful or lines or ["failed without output"])[0][:300]


def _compile(folder: Path) -> Path:
    """Compile into a unique temporary file in folder, rename it into place, then write its checksum."""
    path, version = compiler()
    fd, partial = tempfile.mkstemp(prefix=f".{LIBRARY}.", suffix=".tmp", dir=folder)
    os.close(fd)
    command = _command(path, partial, target_isa())
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_SECONDS)
            output, failed = result.stdout + result.stderr, result.returncode != 0
        except subprocess.TimeoutExpired:
            output, failed = f"error: {path} took over {COMPILE_SECONDS} s", True
        if failed:
            write_text(" ".join(command) + "\n\n" + output, folder / LOG)
            reason = (f"{Path(path).name} failed: {first_error(output)} (full output: {folder / LOG}; once fixed, "
                      "`jaxcascade build-kernels` tries again)")
            write_text(json.dumps({"reason": reason, "compiler": version, "command": command}), folder / FAILED)
            raise KernelUnavailable(reason)
        os.chmod(partial, 0o755 if os.environ.get(KERNEL_DIR_ENV) else 0o700)
        os.replace(partial, folder / LIBRARY)
        write_text(_sha256(folder / LIBRARY) + "\n", folder / CHECKSUM)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return folder / LIBRARY


def build(folder: Path | None = None, *, retry_failed: bool = False) -> Path:
    """The verified library of folder (default `kernel_dir()`), built under a lock if need be.

    A failure marker left by an earlier build is final unless retry_failed; a library that fails its
    checksum is rebuilt once.
    """
    from filelock import FileLock, Timeout

    folder = folder or kernel_dir()
    with contextlib.suppress(OSError):  # a whole build needs neither a lock nor write access
        library = verified(folder)
        if library is not None:
            return library
    try:
        _make_folders(folder)
        lock = FileLock(str(folder / LOCK), timeout=LOCK_SECONDS)
        with lock:
            library = verified(folder)
            if library is not None:
                return library
            marker = folder / FAILED
            if marker.exists() and not retry_failed:
                raise KernelUnavailable(json.loads(marker.read_text()).get("reason", "an earlier build failed"))
            marker.unlink(missing_ok=True)
            # A killed build's temporaries: only the lock's holder writes here, so none is in use.
            for stale in (folder / LIBRARY, folder / CHECKSUM, *folder.glob(f".{LIBRARY}.*.tmp")):
                stale.unlink(missing_ok=True)
            _compile(folder)
            library = verified(folder)
            if library is None:
                raise KernelUnavailable(f"{folder / LIBRARY} does not match its checksum after a fresh build")
            return library
    except Timeout:
        raise KernelUnavailable(f"another process held {folder / LOCK} for over {LOCK_SECONDS} s") from None
    except OSError as error:
        raise KernelUnavailable(f"cannot build in {folder} ({error.strerror or error})") from None


def build_kernels() -> dict:
    """Build now, retrying a failed build (`jaxcascade build-kernels`): where, with what, and how."""
    try:
        path, version = compiler()
        library = build(retry_failed=True)
        isa = target_isa()
    except KernelUnavailable as error:
        raise UserError(f"the CPU kernels could not be built: {error}") from None
    return {"library": str(library), "variant": isa, "compiler": f"{path} ({version})",
            "command": " ".join(_command(path, str(library), isa))}


def wanted(setting: str, machine: str, cpu_flags: set[str], forced_isa: str = "") -> bool:
    """Whether to use the kernels (kernel_target.choose): JAXCASCADE_CPU_KERNEL=0/1 decides; by default on
    the CPU classes where they were measured faster than XLA's GEMMs (AVX-512), or where
    JAXCASCADE_CPU_KERNEL_ISA asks for a variant."""
    return kernel_target.choose(setting, forced_isa, machine, cpu_flags).use



def loaded_isa(library: ctypes.CDLL) -> str:
    """The variant a loaded library was compiled as (its JaxcascadeKernelIsa())."""
    function = library.JaxcascadeKernelIsa
    function.restype = ctypes.c_char_p
    return function().decode()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels are built, verified and registered with XLA (building them the first time).

    Call it only when lowering for CPU: elsewhere the kernels are never used.
    """
    choice = kernel_target.this_machine()
    if not choice.use:
        if os.environ.get(ISA_ENV, "").strip():  # asked for a variant this CPU cannot run: say so
            warnings.warn(f"the CPU kernels are not used: {choice.reason}", JaxcascadeWarning, stacklevel=2)
        return False
    import jax

    try:
        library = load(build())
        if loaded_isa(library) != choice.isa:
            raise KernelUnavailable(f"the library is the {loaded_isa(library)} variant, not {choice.isa} "
                                    f"(the compiler ignored {' '.join(kernel_target.compile_flags(choice.isa, platform.machine()))})")
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as error:
        warnings.warn(f"the CPU convolution kernels are unavailable ({error}); using XLA's GEMM formulations, "
                      f"about 2x slower ({KERNEL_ENV}=0 silences this)", JaxcascadeWarning, stacklevel=2)
        return False
    return True
