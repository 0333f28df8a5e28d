"""Outputs: paths checked before any work starts, and files that appear whole or not at all.

Every file jaxcascade writes goes through `atomic_path`: written under a
temporary name in the target's folder, synced, then renamed into place, so a
reader (or a crash, or a lost node) never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxcascade.errors import UserError


NIFTI_SUFFIXES = (".nii.gz", ".nii")
# The longest file name (bytes) that Linux file systems (ext4, xfs, btrfs, tmpfs, NFS) take.
NAME_MAX = 255
# What `atomic_path` adds to a name for its temporary: "." + name + ".tmp-" + 8 random characters + suffix.
_TEMPORARY_EXTRA = 1 + 5 + 8 + len(".nii.gz")


def fitting_prefix(prefix: str, longest_suffix: int) -> str:
    """`prefix`, or where prefix + a suffix of `longest_suffix` bytes (and its temporary) would pass NAME_MAX,
    its start and a hash of the whole: distinct prefixes stay distinct, and the same one always maps alike."""
    room = NAME_MAX - _TEMPORARY_EXTRA - longest_suffix
    encoded = prefix.encode()
    if len(encoded) <= room:
        return prefix
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    start = encoded[:room - len(digest) - 1].decode(errors="ignore")  # whole characters only
    return f"{start}-{digest}"


def _check_parent(path: Path, shown: str, parents: bool = False) -> None:
    """The folder path goes into exists (or, with parents, can be made), is a folder and takes new files."""
    for ancestor in reversed(path.parents):  # the first file among the path's components
        if ancestor.exists() and not ancestor.is_dir():
            raise UserError(f"{shown}: {ancestor} is a file, not a folder; choose a path in a folder")
    parent = path.parent
    while parents and not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{shown}: folder {parent} does not exist; create it first or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{shown}: folder {parent} is not writable (permissions or a read-only file system); "
                        "choose another path")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False,
                      nifti: bool = False, inputs=(), parents: bool = False) -> Path:
    """Fail early (before any work) if `path` cannot be written: one line per mistake, nothing created.

    A file (is_dir False): not an existing folder, not an existing file unless overwrite, a NIfTI name
    (.nii or .nii.gz) if nifti, none of `inputs`. A folder (is_dir True): not an existing file; an
    existing folder must be writable. Either way every component above it is a folder, and the folder
    it goes into exists and is writable (with parents, the nearest existing one: the caller makes the rest).
    """
    text = os.fspath(path)
    if not text.strip():
        raise UserError("an output path is empty; give a file or folder name")
    path = Path(text)
    kind = "folder" if is_dir else "file"
    if path.is_symlink() and not path.exists():
        raise UserError(f"{text}: a symbolic link to {os.readlink(path)}, which does not exist; create its "
                        "target or choose another path")
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise UserError(f"{text}: a name in this path is longer than {NAME_MAX} bytes, which file systems refuse; "
                        "choose a shorter one")
    if not is_dir and text.endswith(os.sep):
        raise UserError(f"{text}: names a folder (trailing {os.sep}); give a file name, e.g. {text.rstrip(os.sep)}"
                        f"{'' if text.rstrip(os.sep).endswith(NIFTI_SUFFIXES) else '/seg.nii.gz'}")
    _check_parent(path.absolute(), text, parents)
    if is_dir:
        if path.exists() and not path.is_dir():
            raise UserError(f"{text}: exists and is a file; the output {kind} must be a new or existing folder")
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{text}: folder is not writable (permissions or a read-only file system)")
        return path
    if path.is_dir():
        raise UserError(f"{text}: is a folder; give a file name inside it, e.g. {path / 'seg.nii.gz'}")
    if nifti and not path.name.endswith(NIFTI_SUFFIXES) or nifti and path.name in NIFTI_SUFFIXES:
        raise UserError(f"{text}: not a NIfTI file name; end it in .nii.gz (compressed) or .nii")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.samefile(source) or \
                Path(os.path.abspath(source)) == Path(os.path.abspath(path)):
            raise UserError(f"{text}: is also an input; writing it would destroy that input, choose another name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{text}: already exists; pass overwrite=True to replace it")
    return path


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Fail early if the file system of `folder` (or its nearest existing ancestor) lacks room for `what`."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UserError(f"{folder}: {free / 2**20:.1f} MB free, {what} needs about {needed_bytes / 2**20:.1f} MB; "
                        "free space or choose another folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` (same suffixes); rename it into place on success."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes owner-only files; outputs get the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        # Synced before the rename and the folder after it: a crash or a lost node (a file system that
        # commits the rename before the data) leaves the old file or the new one, never a zero-length one.
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sync_folder(folder: str | os.PathLike) -> None:
    """Make the renames into `folder` durable (a lost node must not forget them)."""
    _fsync(folder, folder=True)


def _fsync(path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if not folder or error.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj):
    """NaN (an undefined metric) becomes null: strict JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path: str | os.PathLike) -> None:
    text = json.dumps(json_safe(obj), indent=2, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    raise TypeError(type(value).__name__)
