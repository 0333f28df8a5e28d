"""What a study owns in its output folder, and what each subject's result was made from.

Ownership. An output folder may hold other tools' files (a derivatives dataset beside others, a folder
the user keeps notes in), so the study deletes or overwrites only files it recorded as its own: each
subject's record of files, OUT/.jaxcascade/<folder>/<prefix>.json, is written and synced before the
files themselves, so a run killed midway still knows them; the study's tables are recorded in
OUT/.jaxcascade/study.json. A file at one of its output names that no record claims is someone else's:
the subject becomes an error row naming it (a table: the study is refused), and the file stays as it
was. `dataset_description.json` speaks for itself: one whose GeneratedBy is not jaxcascade makes the
folder another tool's dataset, refused before any work.

Staleness. Each report holds the identity of what made it: the model (a hash of the files it is loaded
from), the settings, and every input file (size, mtime, a hash of its header bytes). A subject whose
report's identity differs from this run's is redone; a report that cannot be read is "not done".
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

from jaxcascade.errors import UserError
from jaxcascade.runtime.outputs import write_json

RECORDS = ".jaxcascade"
STUDY = "study"  # the record of the study's own files at the folder's top (the tables)
DESCRIPTION = "dataset_description.json"
TABLES = ("lesions.csv", "lesion_table.csv")
# A NIfTI-2 header is 540 bytes and a NIfTI-1 header 348 (+ 4 of extension flags): both fit.
HEADER_BYTES = 544


def model_identity(model_dir) -> str:
    """A hash of what `Cascade.load` reads: the config, the training data record and both stages' weights."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    weights = sorted(p for p in (model_dir / "weights").rglob("*") if p.is_file())
    for path in [model_dir / "config.json", model_dir / "training_data.json", *weights]:
        if path.is_file():
            digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def input_identity(path) -> dict | None:
    """Size, mtime and a hash of the header bytes of an input file (None: it cannot be read).

    The header hash tells a replaced file of the same size apart even where mtimes are coarse or were
    copied along (cp -p, rsync -t); the mtime catches a changed voxel without reading every voxel.
    """
    try:
        stat = os.stat(path)
        opener = gzip.open if str(path).endswith(".gz") else open
        try:
            with opener(path, "rb") as file:
                header = file.read(HEADER_BYTES)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            header = b""  # a damaged file: its size and mtime still identify it
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "header_sha256": hashlib.sha256(header).hexdigest()}


def subject_identity(model_hash: str, settings: dict, files: dict) -> dict:
    """What a subject's result is made from; files maps a role (modality, truth, brain_mask) to a path or None."""
    return {"model_sha256": model_hash, "settings": dict(settings),
            "inputs": {role: None if path is None else input_identity(path) for role, path in sorted(files.items())}}


def read_report(path) -> dict | None:
    """A subject's report (or error record), or None where there is none or it is damaged (zero-length,
    cut short, not JSON or not a report): such a subject is not done."""
    try:
        report = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    valid = (isinstance(report, dict) and isinstance(report.get("row"), dict)
             and isinstance(report.get("lesions"), list) and isinstance(report["row"].get("status"), str))
    return report if valid else None


def _record_path(out_dir: Path, key: str) -> Path:
    return out_dir / record_name(key)


def record_name(key: str) -> str:
    """key's record, relative to the output folder."""
    return f"{RECORDS}/{key}.json"


def remove_temporaries(out_dir: Path, names) -> None:
    """Temporary files a killed run left beside these outputs (relative to out_dir): `atomic_path` names them
    `.<name>.tmp-*`. Only the holder of the lock over those names may call it, and only theirs go."""
    for name in names:
        path = out_dir / name
        for temporary in path.parent.glob(f".{glob.escape(path.name)}.tmp-*") if path.parent.is_dir() else ():
            temporary.unlink(missing_ok=True)


def subject_key(folder: Path, prefix: str) -> str:
    return (Path(folder) / prefix).as_posix()


def owned(out_dir: Path, key: str) -> set[str]:
    """The files (relative to out_dir) recorded as written for key."""
    try:
        files = json.loads(_record_path(out_dir, key).read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in files if isinstance(name, str)}


def _write_record(out_dir: Path, key: str, files: set[str]) -> None:
    path = _record_path(out_dir, key)
    if not files:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"files": sorted(files)}, path)


def foreign(out_dir: Path, key: str, names) -> Path | None:
    """The first of names that exists in out_dir and is not recorded as key's (someone else's file), if any."""
    mine = owned(out_dir, key)
    for name in names:
        path = out_dir / name
        if name not in mine and (path.exists() or path.is_symlink()):
            return path
    return None


def not_ours(path: Path, what: str = "choose another out_dir=...") -> UserError:
    return UserError(f"{path}: exists and was not written by jaxcascade (no record of it in "
                     f"{RECORDS}/); move it away or {what}")


def claim(out_dir: Path, key: str, names) -> None:
    """Record names as key's before writing them; UserError naming the first that is someone else's."""
    names = set(names)
    taken = foreign(out_dir, key, sorted(names))
    if taken is not None:
        raise not_ours(taken, "delete it, and run again")
    mine = owned(out_dir, key)
    if not names <= mine:
        _write_record(out_dir, key, mine | names)


def remove_owned(out_dir: Path, key: str, keep=()) -> None:
    """Delete key's recorded files, apart from keep (names), and forget them."""
    mine = owned(out_dir, key)
    for name in sorted(mine - set(keep)):
        (out_dir / name).unlink(missing_ok=True)
    _write_record(out_dir, key, mine & set(keep))


def recorded_keys(out_dir: Path) -> list[str]:
    """Every subject with a record of files in out_dir (finished, failed or cut short)."""
    root = out_dir / RECORDS
    keys = (p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.json") if p.is_file())
    return sorted(key for key in keys if key != STUDY)


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, an out_dir that is another tool's: its dataset_description.json names
    another generator (or cannot be read), or a table at one of the study's names was not written by it."""
    description = out_dir / DESCRIPTION
    if description.is_file():
        text = description.read_bytes()
        if text.strip() and describer(text) != "jaxcascade":
            who = describer(text)
            said = f"describes another tool's dataset ({who})" if who else "cannot be read as a dataset description"
            raise UserError(f"{description}: {said}; jaxcascade writes into a folder of its own: choose another "
                            "out_dir=... (for BIDS data, DATA/derivatives/jaxcascade)")
    taken = foreign(out_dir, STUDY, TABLES)
    if taken is not None:
        raise not_ours(taken)


def describer(text: bytes) -> str | None:
    """Who a dataset_description.json says made the dataset: its GeneratedBy names, else its Name."""
    try:
        description = json.loads(text)
        names = [entry.get("Name") for entry in description.get("GeneratedBy") or [] if isinstance(entry, dict)]
    except (ValueError, AttributeError, TypeError):
        return None
    if "jaxcascade" in names:
        return "jaxcascade"
    named = [str(name) for name in names if name] or [str(description.get("Name") or "")]
    return ", ".join(name for name in named if name) or "no GeneratedBy"
