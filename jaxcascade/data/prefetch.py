"""Decompress gzipped inputs in a background thread while the command line imports JAX.

A `segment` call spends its first second and more importing jax and flax, which holds the interpreter;
inflating a 1 mm brain's two `.nii.gz` files takes another quarter of a second, and zlib lets other
threads run while it inflates. So the command line starts the inflating first (`start`), and
`nifti.load_image` takes the bytes (`take`) when it reaches the file — only if the file is still the
one that was read (same device, inode, size and modification time); otherwise, or after any error
here, the file is read as usual and its problems are reported there. Light on purpose: imports
nothing but the standard library.
"""

from __future__ import annotations

import os
import threading
import zlib

# Files larger than this are left to the usual reader; the inflated size is capped too (a gzip bomb
# must not fill the memory from a thread nobody waits on).
MAX_COMPRESSED_BYTES = 256 * 2**20
MAX_INFLATED_BYTES = 2 * 2**30

_lock = threading.Lock()
_pending: dict[str, tuple[threading.Thread, dict]] = {}


def _identity(path: str) -> tuple:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _inflate(path: str, slot: dict) -> None:
    try:
        identity = _identity(path)
        if identity[2] > MAX_COMPRESSED_BYTES:
            return
        with open(path, "rb") as file:
            compressed = file.read()
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # gzip framing
        raw = inflater.decompress(compressed, MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            return  # larger than the cap, several gzip members, or truncated: the usual reader decides
        slot["identity"], slot["raw"] = identity, raw
    except (OSError, zlib.error, MemoryError):
        return


def start(paths) -> None:
    """Begin inflating each existing `.gz` file of paths (one daemon thread per file)."""
    for path in paths:
        path = os.path.abspath(os.fspath(path))
        if not path.endswith(".gz") or not os.path.isfile(path):
            continue
        with _lock:
            if path in _pending:
                continue
            slot: dict = {}
            thread = threading.Thread(target=_inflate, args=(path, slot), daemon=True, name="jaxcascade-inflate")
            _pending[path] = (thread, slot)
        thread.start()


def take(path) -> bytes | None:
    """The inflated bytes of path if `start` was given it and the file has not changed since; else None."""
    path = os.path.abspath(os.fspath(path))
    with _lock:
        pending = _pending.pop(path, None)
    if pending is None:
        return None
    thread, slot = pending
    thread.join()
    try:
        unchanged = slot.get("identity") == _identity(path)
    except OSError:
        return None
    return slot.get("raw") if unchanged else None


def forget() -> None:
    """Drop whatever was inflated and not taken (a call that failed before reading its inputs)."""
    with _lock:
        _pending.clear()
