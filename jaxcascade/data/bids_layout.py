"""BIDS datasets in and out: finding each session's sequences, and a derivatives dataset out.

A folder holding dataset_description.json is read as BIDS: the model's modalities map to BIDS suffixes
(T1 -> T1w, FLAIR -> FLAIR, T2 -> T2w, PD -> PDw, or `--bids-suffix NAME=SUFFIX`), found as
sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<entity>-<value>...]_<suffix>.nii[.gz].
Datasets arrive in many shapes and all are read: raw datasets with no derivatives/, derivatives of
other pipelines, sessions in some participants only, .nii or .nii.gz, symbolic links (DataLad and
git-annex trees; a link whose content was never fetched makes that session an error row saying so),
a participants.tsv (participants it lists without a folder are named in a note).

Several images of one suffix in a session (runs, acquisitions, reconstructions, echoes, ...):
  - `--bids-filter [MODALITY:]ENTITY=VALUE` keeps those with that entity (e.g. FLAIR:acq=3d, run=1),
    wherever a session has several images carrying the entity; ENTITY=none keeps those without it
    (space=none: fMRIPrep's native-space desc-preproc_T1w rather than its space-MNI* ones);
  - if what remains differs only in `run`, the last run is used (the usual repeat of a spoilt
    acquisition), and a note says which;
  - otherwise the session is an error row naming the entities that differ and the filter to give.
A lesion mask, where one exists for scoring, is a derivatives file *_label-lesion_mask.nii[.gz] of the
same subject and session in any derivatives/<pipeline>/ folder or in derivatives/ itself (masks in a
template space, space-MNI*,
are not on the subject's grid and are skipped), a brain mask a *_desc-brain_mask one. Files are found
by their names alone, the way the BIDS specification defines them, so no index is built and nothing
else in the tree (sidecars, other datatypes, other pipelines' outputs) is read.
Outputs form a BIDS derivatives dataset: dataset_description.json (DatasetType derivative, GeneratedBy
jaxcascade and its version) and sub-X/[ses-Y/]anat/sub-X[_ses-Y]_desc-lesion_mask.nii.gz and friends
(`study.py`).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Callable

from jaxcascade.version import __version__
from jaxcascade.errors import UserError
from jaxcascade.runtime.outputs import write_json

DEFAULT_SUFFIXES = {"T1": "T1w", "FLAIR": "FLAIR", "T2": "T2w", "PD": "PDw"}
_EXTENSIONS = (".nii.gz", ".nii")
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")
# A training-layout folder's name may hold more than a BIDS label (patient_01, case-3.b); never a path.
_FOLDER_NAME = re.compile(r"^[\w.-]+$")
# A filter's value that keeps the images without the entity (space=none: fMRIPrep's native-space outputs).
NO_ENTITY = "none"


def is_bids(root) -> bool:
    return (Path(root) / "dataset_description.json").is_file()


def parse_name(name: str) -> tuple[dict, str] | None:
    """BIDS entities and suffix of a NIfTI file name ('sub-01_ses-1_run-2_FLAIR.nii.gz' ->
    ({'sub': '01', 'ses': '1', 'run': '2'}, 'FLAIR')), or None for any other name."""
    extension = next((e for e in _EXTENSIONS if name.endswith(e)), None)
    if extension is None:
        return None
    *pairs, suffix = name[: -len(extension)].split("_")
    entities = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not _LABEL.match(key) or not _LABEL.match(value) or key in entities:
            return None
        entities[key] = value
    if not pairs or next(iter(entities)) != "sub" or not _LABEL.match(suffix):
        return None
    return entities, suffix


def parse_filters(pairs) -> list[tuple[str | None, str, str]]:
    """['FLAIR:acq=3d', 'run=1'] -> [('FLAIR', 'acq', '3d'), (None, 'run', '1')]."""
    filters = []
    for pair in pairs or []:
        target, _, condition = pair.rpartition(":")
        entity, sep, value = condition.partition("=")
        value = value[len(entity) + 1:] if value.startswith(f"{entity}-") else value  # run=run-2 -> run=2
        if not sep or not _LABEL.match(entity or "-") or not _LABEL.match(value or "-"):
            raise UserError(f"bids_filters=[{pair!r}]: expected [MODALITY:]ENTITY=VALUE, "
                            "e.g. bids_filters=['FLAIR:acq=3d', 'run=1']")
        filters.append((target or None, entity, value))
    return filters


def participant_labels(labels) -> list[str]:
    """['01', 'sub-02'] -> ['01', '02'] (BIDS Apps accept either form); in a training-layout folder a
    label may also be a subject folder's name (patient_01), which `sessions` refuses for BIDS."""
    cleaned = []
    for label in labels or []:
        for part in str(label).replace(",", " ").split():
            bare = part[4:] if part.startswith("sub-") else part
            if not _FOLDER_NAME.match(bare) or bare in (".", ".."):
                raise UserError(f"participants=[{part!r}]: a participant label is letters and digits, "
                                "e.g. 01 or sub-01 (or, in a training-layout folder, a subject folder's name)")
            cleaned.append(bare)
    return cleaned


def _entries(folder: Path):
    """(name, path) of the files in folder, symbolic links included (also broken ones); none if no folder."""
    try:
        with os.scandir(folder) as scan:
            return sorted((e.name, Path(e.path)) for e in scan if e.is_symlink() or e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subject_sessions(root: Path, subject: str) -> list[tuple[str, Path]]:
    """(session label or '', anat folder) of each session of sub-<subject>."""
    folder = root / f"sub-{subject}"
    sessions = sorted(p.name[4:] for p in folder.iterdir() if p.is_dir() and p.name.startswith("ses-"))
    found = [(session, folder / f"ses-{session}" / "anat") for session in sessions]
    if (folder / "anat").is_dir() or not found:
        found.insert(0, ("", folder / "anat"))
    return found


def _images(folder: Path, subject: str, session: str) -> list[tuple[dict, str, Path]]:
    """(entities, suffix, path) of the NIfTI files of one subject and session in folder."""
    images = []
    for name, path in _entries(folder):
        parsed = parse_name(name)
        if parsed and parsed[0].get("sub") == subject and parsed[0].get("ses", "") == session:
            images.append((*parsed, path))
    return images


def _choose(images, modality: str, suffix: str, filters, where: str) -> tuple[Path | None, str | None, str | None]:
    """(file, note, problem) for one modality among a session's images."""
    matching = [(entities, path) for entities, found_suffix, path in images if found_suffix == suffix]
    if not matching:
        return None, None, f"no *_{suffix} image in anat"
    for target, entity, value in filters:
        # A filter chooses among several images that carry its entity; elsewhere it does not apply.
        if target in (None, modality) and len(matching) > 1 and any(entity in e for e, _ in matching):
            kept = [(e, p) for e, p in matching if (entity not in e if value == NO_ENTITY else e.get(entity) == value)]
            if not kept:
                wanted = f"no {entity}-" if value == NO_ENTITY else f"{entity}-{value}"
                return None, None, (f"none of {len(matching)} *_{suffix} images has {wanted} "
                                    f"({', '.join(p.name for _, p in matching)}); fix bids_filters=...")
            matching = kept
    if len(matching) == 1:
        return matching[0][1], None, None
    keys = sorted({key for entities, _ in matching for key in entities} - {"sub", "ses"})
    differing = [k for k in keys if len({entities.get(k) for entities, _ in matching}) > 1]
    names = ", ".join(p.name for _, p in matching)
    runs = [_run_number(entities) for entities, _ in matching]
    if differing == ["run"] and len(set(runs)) == len(runs):  # runs that can be ordered (BIDS runs are numbers)
        last = max(matching, key=lambda item: _run_number(item[0]))
        return last[1], (f"{where}: {len(matching)} runs of *_{suffix}; using the last, {last[1].name} "
                         f"(choose with bids_filters=['{modality}:run=N'])"), None
    if not differing:
        return None, None, f"{len(matching)} *_{suffix} images that differ only in extension ({names}); keep one"
    choices = " or ".join(f"bids_filters=['{modality}:{k}=VALUE']" for k in differing)
    return None, None, (f"{len(matching)} *_{suffix} images differ in {', '.join(differing)} ({names}); "
                        f"choose one with {choices}")


def _run_number(entities: dict) -> int:
    """The run's number (BIDS runs are integers); an image without one counts as before run 0."""
    run = entities.get("run", "")
    return int(run) if run.isdigit() else -1


def _derivative_masks(root: Path, subject: str, session: str) -> tuple[list[Path], list[Path]]:
    """(lesion masks, brain masks) of one session in every derivatives/<pipeline>/ folder."""
    lesions, brains = [], []
    derivatives = root / "derivatives"
    # derivatives/<pipeline>/sub-X/..., or derivatives/sub-X/... straight (as some datasets keep them).
    pipelines = [derivatives, *sorted(p for p in derivatives.iterdir() if p.is_dir())] if derivatives.is_dir() else []
    relative = Path(f"sub-{subject}", f"ses-{session}", "anat") if session else Path(f"sub-{subject}", "anat")
    for pipeline in pipelines:
        for entities, suffix, path in _images(pipeline / relative, subject, session):
            if suffix != "mask" or entities.get("space", "").startswith("MNI"):
                continue
            if entities.get("label") == "lesion":
                lesions.append(path)
            elif entities.get("desc") == "brain":
                brains.append(path)
    return lesions, brains


def _listed_participants(root: Path) -> list[str]:
    try:
        # utf-8-sig: a table saved by Excel or Notepad starts with a byte-order mark, not with its header.
        with open(root / "participants.tsv", newline="", encoding="utf-8-sig") as table:
            return [row.get("participant_id", "") for row in csv.DictReader(table, delimiter="\t")]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _session_entry(root: Path, subject: str, session: str, anat: Path, modalities: tuple[str, ...],
                   suffixes: dict[str, str], filters: list[tuple[str | None, str, str]],
                   log: Callable[[str], None]) -> dict | None:
    """One row of `sessions`; None (logged) for a session without an anat/ folder."""
    where = f"sub-{subject} ses-{session}" if session else f"sub-{subject}"
    entry = {"participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else "",
             "inputs": {}, "truth": None, "brain_mask": None, "problem": None}
    if not anat.is_dir():
        # Not a session of this tool's kind (sub-emptyroom's MEG, a session with func/ only); an anat/
        # that lacks a sequence is a problem of that session, said in its row.
        log(f"{where}: no anat/ folder (no anatomical images); skipped")
        return None
    images = _images(anat, subject, session)
    problems = []
    for modality in modalities:
        path, note, problem = _choose(images, modality, suffixes[modality], filters, where)
        if note:
            log(note)
        if problem:
            problems.append(problem)
        elif not path.exists():
            problems.append(f"{path.name} is a broken symbolic link (content not fetched? for DataLad "
                            "or git-annex: datalad get / git annex get)")
        else:
            entry["inputs"][modality] = path
    entry["problem"] = "; ".join(problems) or None
    lesions, brains = _derivative_masks(root, subject, session)
    entry["truth"] = lesions[0] if len(lesions) == 1 else None
    entry["lesion_masks"] = lesions  # several (raters?): segmented, not scored
    entry["brain_mask"] = brains[0] if len(brains) == 1 else None
    return entry


def sessions(root, modalities: tuple[str, ...], suffixes: dict[str, str], *, participants=None,
             filters=None, log=None) -> list[dict]:
    """Every subject/session: {'participant_id', 'session_id', 'inputs', 'truth', 'brain_mask', 'problem'}.

    'inputs' maps each modality to its file; 'problem' is a one-line reason when a sequence is missing,
    ambiguous or a broken link (that session becomes an error row, the others go on). participants
    limits it to those labels (BIDS Apps' --participant-label); filters are `parse_filters`' output.
    `log` receives one line per choice made (the run used) and per oddity noticed.
    """
    root = Path(root)
    unknown = [m for m in modalities if m not in suffixes]
    if unknown:
        raise UserError(f"{root}: no BIDS suffix for modality {', '.join(unknown)}; give bids_suffixes={{'NAME': "
                        "'SUFFIX'}} (segment, change) or --config.data.bids_suffixes=NAME=SUFFIX (train)")
    log = log or (lambda message: None)
    filters = parse_filters(filters) if filters and isinstance(filters[0], str) else list(filters or [])
    subjects = sorted(p.name[4:] for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")
                      and _LABEL.match(p.name[4:]))
    listed = [p for p in _listed_participants(root) if p.startswith("sub-") and p[4:] not in subjects]
    if listed:
        log(f"{root}: participants.tsv lists {', '.join(listed[:5])}{' ...' if len(listed) > 5 else ''} "
            "without a folder; skipped")
    if participants:
        wanted = participant_labels(participants)
        not_bids = [label for label in wanted if not _LABEL.match(label)]
        if not_bids:
            raise UserError(f"participants=[{not_bids[0]!r}]: a BIDS participant label is letters and digits, "
                            f"e.g. 01 or sub-01 ({root} is a BIDS dataset)")
        missing = [label for label in wanted if label not in subjects]
        if missing:
            shown = ", ".join(subjects[:10]) + (" ..." if len(subjects) > 10 else "")
            raise UserError(f"{root}: no participant {', '.join('sub-' + m for m in missing)} "
                            f"(the dataset has sub-{shown.replace(', ', ', sub-')})")
        subjects = [s for s in subjects if s in wanted]
    found = []
    for subject in subjects:
        for session, anat in _subject_sessions(root, subject):
            entry = _session_entry(root, subject, session, anat, modalities, suffixes, filters, log)
            if entry is not None:
                found.append(entry)
    if not found:
        raise UserError(f"{root}: a BIDS dataset without anatomical images (expected sub-<label>/[ses-<label>/]"
                        "anat/sub-<label>_<suffix>.nii.gz)")
    return found


def training_sessions(root, modalities: tuple[str, ...], suffixes: dict[str, str], *, participants=None,
                      filters=None, log=None) -> list[tuple[str, dict, Path]]:
    """(name, {modality: file}, lesion mask) of every session that can train: all sequences and a lesion mask.

    The name is sub-X_ses-Y (sub-X without sessions). Sessions without a lesion mask are unlabelled and
    left out; a labelled session that lacks a sequence is an error, since a whole dataset would silently
    shrink otherwise.
    """
    entries = sessions(root, modalities, suffixes, participants=participants, filters=filters, log=log)

    def where(entry):
        return f"{entry['participant_id']} {entry['session_id']}".strip()

    broken = [f"{where(entry)}: {entry['problem']}" for entry in entries if entry["truth"] and entry["problem"]]
    broken += [f"{where(entry)}: {len(entry['lesion_masks'])} *_label-lesion_mask derivatives "
               f"({', '.join(m.name for m in entry['lesion_masks'])}); keep one"
               for entry in entries if len(entry["lesion_masks"]) > 1]
    if broken:
        raise UserError(f"{root}: labelled sessions that cannot train: {'; '.join(broken)}")
    labelled = [(session_name(entry["participant_id"], entry["session_id"]), entry["inputs"], entry["truth"])
                for entry in entries if entry["truth"]]
    if not labelled:
        raise UserError(f"{root}: no session has a lesion mask (derivatives/<pipeline>/sub-*/[ses-*/]anat/"
                        "*_label-lesion_mask.nii.gz); training needs them")
    return labelled


def session_name(participant_id: str, session_id: str) -> str:
    """sub-X_ses-Y, or sub-X for a dataset without sessions: how reports and folds name a session."""
    return "_".join(part for part in (participant_id, session_id) if part)


def participant_of(name: str) -> str:
    """The participant of a session name (sub-01_ses-2 -> sub-01); other names are their own participant."""
    return name.split("_ses-")[0]


def output_location(participant_id: str, session_id: str) -> tuple[Path, str]:
    """(folder relative to the derivatives root, file-name prefix) of a session's outputs."""
    folder = Path(participant_id, session_id, "anat") if session_id else Path(participant_id, "anat")
    return folder, session_name(participant_id, session_id)


def describe_derivatives(out_dir: Path, source: Path) -> None:
    """dataset_description.json of the outputs, as a BIDS derivatives dataset."""
    write_json({
        "Name": "jaxcascade MS lesion segmentation",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "jaxcascade", "Version": __version__,
                         "Description": "cascaded 3D CNN (Valverde et al. 2017)"}],
        "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
    }, out_dir / "dataset_description.json")


def parse_suffixes(pairs) -> dict[str, str]:
    """DEFAULT_SUFFIXES updated by ['FLAIR=FLAIR', 'T1=T1w', ...] (or one comma-separated string of them)."""
    suffixes = dict(DEFAULT_SUFFIXES)
    if isinstance(pairs, str):
        pairs = [pair.strip() for pair in pairs.split(",") if pair.strip()]
    for pair in pairs or []:
        name, sep, suffix = pair.partition("=")
        if not sep or not name or not suffix:
            raise UserError(f"BIDS suffix {pair!r}: expected NAME=SUFFIX, e.g. bids_suffixes={{'T1': 'T1w'}}")
        suffixes[name] = suffix
    return suffixes
