"""BIDS datasets in and out: finding each session's sequences with pybids, and a derivatives dataset out.

A folder holding dataset_description.json is read as BIDS: the model's modalities map to BIDS suffixes
(T1 -> T1w, FLAIR -> FLAIR, T2 -> T2w, PD -> PDw, or `--bids-suffix NAME=SUFFIX`), searched as
sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]. A lesion mask, where one exists for scoring, is a derivatives
file *_label-lesion_mask.nii[.gz] of the same subject and session, a brain mask a *_desc-brain_mask one.
Outputs form a BIDS derivatives
dataset: dataset_description.json (DatasetType derivative, GeneratedBy jaxcascade and its version) and
sub-X/[ses-Y/]anat/sub-X[_ses-Y]_desc-lesion_mask.nii.gz and friends (`study.py`). pybids is an extra:
    pip install 'jaxcascade[bids]'
"""

from __future__ import annotations

from pathlib import Path

from jaxcascade import __version__
from jaxcascade.errors import UserError
from jaxcascade.outputs import write_json

DEFAULT_SUFFIXES = {"T1": "T1w", "FLAIR": "FLAIR", "T2": "T2w", "PD": "PDw"}
_IMAGES = [".nii.gz", ".nii"]


def is_bids(root) -> bool:
    return (Path(root) / "dataset_description.json").is_file()


def _layout(root: Path):
    try:
        from bids import BIDSLayout
    except ImportError:
        raise UserError(f"{root}: a BIDS dataset; reading it needs pybids: pip install 'jaxcascade[bids]'") from None
    try:
        # derivatives=True indexes every pipeline's outputs under derivatives/ (lesion masks among them).
        return BIDSLayout(str(root), validate=False, derivatives=True)
    except Exception as error:  # noqa: BLE001 - pybids raises many kinds for a malformed dataset
        raise UserError(f"{root}: not a readable BIDS dataset ({type(error).__name__}: {error})") from None


def sessions(root, modalities: tuple[str, ...], suffixes: dict[str, str]) -> list[dict]:
    """Every subject/session: {'participant_id', 'session_id', 'inputs', 'truth', 'problem'}.

    'inputs' maps each modality to its file; 'problem' is a one-line reason when a sequence is missing
    or ambiguous (that session becomes an error row, the others go on).
    """
    root = Path(root)
    unknown = [m for m in modalities if m not in suffixes]
    if unknown:
        raise UserError(f"{root}: no BIDS suffix for modality {', '.join(unknown)}; give --bids-suffix NAME=SUFFIX "
                        "(segment) or --config.data.bids_suffixes=NAME=SUFFIX (train)")
    layout = _layout(root)
    found = []
    for subject in sorted(layout.get_subjects()):
        for session in sorted(layout.get_sessions(subject=subject)) or [None]:
            query = {"subject": subject, "extension": _IMAGES, "return_type": "filename"}
            if session is not None:
                query["session"] = session
            entry = {"participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else "",
                     "inputs": {}, "truth": None, "brain_mask": None, "problem": None}
            for modality in modalities:
                files = layout.get(suffix=suffixes[modality], datatype="anat", scope="raw", **query)
                if len(files) != 1:
                    where = f"{entry['participant_id']} {entry['session_id']}".strip()
                    entry["problem"] = entry["problem"] or (
                        f"{where}: no *_{suffixes[modality]} image in anat" if not files else
                        f"{where}: {len(files)} *_{suffixes[modality]} images ({', '.join(Path(f).name for f in files)}); "
                        "keep one per session")
                    continue
                entry["inputs"][modality] = Path(files[0])
            masks = layout.get(suffix="mask", label="lesion", scope="derivatives", **query)
            entry["truth"] = Path(masks[0]) if len(masks) == 1 else None
            entry["lesion_masks"] = [Path(m) for m in masks]  # several (raters?): segmented, not scored
            brains = layout.get(suffix="mask", desc="brain", scope="derivatives", **query)
            entry["brain_mask"] = Path(brains[0]) if len(brains) == 1 else None
            found.append(entry)
    if not found:
        raise UserError(f"{root}: a BIDS dataset without subjects (expected sub-*/anat/*.nii.gz)")
    return found


def training_sessions(root, modalities: tuple[str, ...], suffixes: dict[str, str]) -> list[tuple[str, dict, Path]]:
    """(name, {modality: file}, lesion mask) of every session that can train: all sequences and a lesion mask.

    The name is sub-X_ses-Y (sub-X without sessions). Sessions without a lesion mask are unlabelled and
    left out; a labelled session that lacks a sequence is an error, since a whole dataset would silently
    shrink otherwise.
    """
    entries = sessions(root, modalities, suffixes)
    broken = [entry["problem"] for entry in entries if entry["truth"] and entry["problem"]]
    broken += [f"{entry['participant_id']} {entry['session_id']}".strip() + f": {len(entry['lesion_masks'])} "
               f"*_label-lesion_mask derivatives ({', '.join(m.name for m in entry['lesion_masks'])}); keep one"
               for entry in entries if len(entry["lesion_masks"]) > 1]
    if broken:
        raise UserError(f"{root}: labelled sessions that cannot train: {'; '.join(broken)}")
    labelled = [(session_name(entry["participant_id"], entry["session_id"]), entry["inputs"], entry["truth"])
                for entry in entries if entry["truth"]]
    if not labelled:
        raise UserError(f"{root}: no session has a lesion mask (derivatives/*/sub-*/[ses-*/]anat/"
                        "*_label-lesion_mask.nii.gz); training and the experiments need them")
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
            raise UserError(f"--bids-suffix {pair!r}: expected NAME=SUFFIX, e.g. --bids-suffix T1=T1w")
        suffixes[name] = suffix
    return suffixes
