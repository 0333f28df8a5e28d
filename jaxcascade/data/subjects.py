"""Subjects of a data folder: the one discovery (`find_subjects`) and the one loader (`load_images`) that
training, studies and single subjects share; training's subjects loaded, normalised, each process's share.

A data folder holds one folder per subject with `<MODALITY><suffix>` for every
config.data.modalities and `<lesion><suffix>` (a study's may lack it, and may hold `brain_mask<suffix>`), or is
a BIDS dataset (`bids_layout`): each session is then a subject named sub-X_ses-Y, its modalities found through
the BIDS suffixes (training takes the sessions with a lesion mask).
Subjects are numbered in sorted name order; the number seeds the subject's sampling and decides its
data shard (`batching`), so a subject is treated the same whichever process
loads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxcascade.data import bids_layout, nifti
from jaxcascade.runtime import distributed

from jaxcascade.errors import UserError
from jaxcascade.data.normalisation import flair_channel, normalise_channels


@dataclasses.dataclass
class Subject:
    name: str
    volume: np.ndarray  # (D, H, W, C) normalised, channels in config.data.modalities order
    lesion: np.ndarray  # bool (D, H, W)
    flair_channel: int
    number: int = 0  # position among all training subjects (seeds its sampling)
    shard: int = 0  # its data shard
    voxel_size_mm: tuple = ()  # of its FLAIR file
    labelled: np.ndarray | None = None  # bool (D, H, W): where the lesion mask holds; None: everywhere

    def sampling_region(self, mask: np.ndarray) -> np.ndarray:
        """`mask` limited to the voxels whose label is known (all of it without a labelled region)."""
        return mask if self.labelled is None else mask & self.labelled

    @property
    def flair(self) -> np.ndarray:
        return self.volume[..., self.flair_channel]


@dataclasses.dataclass(frozen=True)
class SubjectFiles:
    """One subject (or BIDS session) of a data folder, as discovered: its files, not yet read."""

    participant_id: str  # the folder's name, or sub-X
    session_id: str  # ses-Y, or "" without sessions
    inputs: dict  # modality -> Path (a BIDS session may lack some: see problem)
    truth: Path | None  # its lesion mask, if any
    brain_mask: Path | None = None  # restricts normalisation and candidates
    problem: str | None = None  # why it cannot be segmented, found while discovering

    @property
    def name(self) -> str:
        """sub-X_ses-Y (training's subject name; the folder's name in the training layout)."""
        return bids_layout.session_name(self.participant_id, self.session_id) if self.session_id else self.participant_id


def find_subjects(data_dir, data_config, *, strict: bool, bids_suffixes: dict | None = None, participants=None,
                  bids_filters=(), log=None) -> list[SubjectFiles]:
    """Every subject (and session) of a training-layout folder or a BIDS dataset, sorted by name.

    The one discovery that training and studies share. strict (training): every subject needs all
    sequences and a lesion mask, and one that lacks any is an error naming it (a dataset must not shrink
    silently); BIDS sessions without a lesion mask are left out. Not strict (studies): each subject's
    problem is recorded in it (its row says it, the others go on) and lesion masks are optional.
    bids_suffixes: {modality: suffix} (strict: the config's data.bids_suffixes by default; else BIDS's own);
    participants: labels to keep (01 or sub-01; folder names in the training layout); bids_filters:
    `[MODALITY:]ENTITY=VALUE` strings or `bids_layout.parse_filters`' output.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: {'training ' if strict else ''}data folder not found")
    modalities = tuple(data_config.modalities)
    if bids_layout.is_bids(data_dir):
        # Training reads its config's naming; a study names new data, BIDS's own suffixes unless told.
        suffixes = bids_suffixes or (bids_layout.parse_suffixes(data_config.get("bids_suffixes", "")) if strict
                                     else bids_layout.DEFAULT_SUFFIXES)
        if strict:
            labelled = bids_layout.training_sessions(data_dir, modalities, suffixes, participants=participants,
                                                     filters=bids_filters, log=log)
            return [_session_subject(name, inputs, truth) for name, inputs, truth in sorted(labelled)]
        return [SubjectFiles(entry["participant_id"], entry["session_id"], entry["inputs"], entry["truth"],
                             entry["brain_mask"], entry["problem"])
                for entry in bids_layout.sessions(data_dir, modalities, suffixes, participants=participants,
                                                  filters=bids_filters, log=log)]
    if bids_filters:
        raise UserError(f"{data_dir}: bids_filters=... applies to BIDS datasets (this folder has no "
                        "dataset_description.json)")
    return [_folder_subject(folder, data_config) for folder in _subject_folders(data_dir, data_config, strict,
                                                                                participants)]


def _session_subject(name: str, inputs: dict, truth: Path) -> SubjectFiles:
    """A labelled BIDS session named sub-X[_ses-Y] (`bids_layout.training_sessions`)."""
    participant = bids_layout.participant_of(name)
    return SubjectFiles(participant, name[len(participant) + 1:], inputs, truth)


def _subject_folders(data_dir: Path, data_config, strict: bool, participants) -> list[Path]:
    """The training layout's subject folders (strict: all of them, each complete; else those holding a sequence)."""
    names = [f"{m}{data_config.suffix}" for m in data_config.modalities]
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not strict:
        folders = [p for p in folders if any((p / name).exists() for name in names)]
    if not folders:
        expected = f"{data_dir}/<subject>/{names[0]} ..."
        raise UserError(f"{data_dir}: no subject folders (expected {expected})" if strict else
                        f"{data_dir}: no subject folders with {' or '.join(names)} (expected {expected}, or a BIDS "
                        "dataset with dataset_description.json)")
    if strict:
        required = [*names, f"{data_config.lesion}{data_config.suffix}"]
        incomplete = [f"{folder.name} lacks {', '.join(absent)}" for folder in folders
                      if (absent := [name for name in required if not (folder / name).exists()])]
        if incomplete:
            raise UserError(f"{data_dir}: incomplete subjects: {'; '.join(incomplete)}")
    return select_participants(folders, participants, data_dir)


def _folder_subject(folder: Path, data_config) -> SubjectFiles:
    suffix = data_config.suffix
    truth, brain = folder / f"{data_config.lesion}{suffix}", folder / f"brain_mask{suffix}"
    # A broken link (a DataLad file not fetched) is kept, to say so when it is read.
    return SubjectFiles(folder.name, "", {m: folder / f"{m}{suffix}" for m in data_config.modalities},
                        truth if truth.exists() or truth.is_symlink() else None,
                        brain if brain.exists() else None)


def select_participants(folders: list[Path], participants, data_dir) -> list[Path]:
    """The subject folders named by participant labels (`01` names folder 01 or sub-01); all without labels.

    A label that names no folder is an error listing the folders there are.
    """
    if not participants:
        return folders
    names = {folder.name for folder in folders}
    missing = [label for label in participants if not {label, f"sub-{label}"} & names]
    if missing:
        raise UserError(f"{data_dir}: no subject folder {', '.join(map(str, missing))} (it has "
                        f"{', '.join(sorted(names)[:10])}{' ...' if len(names) > 10 else ''})")
    wanted = {str(label) for label in participants} | {f"sub-{label}" for label in participants}
    return [folder for folder in folders if folder.name in wanted]


@dataclasses.dataclass(frozen=True)
class SubjectImages:
    """One subject's sequences read and checked (`load_images`)."""

    images: list  # nifti.Image per modality, in the config's channel order, on the FLAIR's grid
    reference: nifti.Image  # the FLAIR: outputs go on its grid
    brain_mask: np.ndarray | None  # on the reference's processing grid
    resampled: list[str]  # one note per sequence brought onto the FLAIR's grid (`nifti.resampling_notes`)
    skull_stripped: str  # 'masked' (a brain mask given), 'yes' or 'no' (`nifti.looks_skull_stripped`)


def load_images(inputs: dict, data_config, *, brain_mask=None, source: str = "the model") -> SubjectImages:
    """The one subject loader: inputs ({modality: a file or a nibabel image}) in data_config's channel order
    and orientation, all on the FLAIR's grid, and the brain mask file if given; a UserError naming the file
    for any problem. source names whose modalities the inputs must match (a model, a subject)."""
    modalities, flair = tuple(data_config.modalities), data_config.flair
    images = nifti.load_sequences(inputs, modalities, source, orientation=data_config.orientation, reference=flair)
    reference = images[modalities.index(flair)]
    mask = nifti.load_brain_mask(brain_mask, reference) if brain_mask else None
    stripped = "masked" if mask is not None else "yes" if nifti.looks_skull_stripped(reference.data) else "no"
    return SubjectImages(images, reference, mask, nifti.resampling_notes(images, modalities, flair), stripped)


def _labelled_region(lesion_file: Path, data_config, reference) -> np.ndarray | None:
    """The subject's labelled-region mask beside its lesion mask, if it has one (folder layout only)."""
    name = data_config.get("labelled", "")
    path = Path(lesion_file).with_name(f"{name}{data_config.suffix}") if name else None
    if path is None or not path.exists() or path == Path(lesion_file):
        return None
    region = nifti.load_lesion_mask(path, reference)
    if not region.any():
        raise UserError(f"{path}: the labelled region is empty; remove the file to use the whole image")
    return region


def load_training_subjects(data_dir, config, num_shards: int = 1, participants=None) -> list[Subject]:
    """This process's training subjects: those of its data shards (every subject with one shard).

    Collective in a multi-process run: each process loads its own share.
    """
    modalities = tuple(config.data.modalities)
    channel = flair_channel(config)
    nifti.check_orientation(config.data.orientation)
    if len(set(modalities)) != len(modalities):
        raise UserError(f"config data.modalities names a modality twice: {', '.join(modalities)}")
    folders = find_subjects(data_dir, config.data, strict=True, participants=participants)
    if len(folders) < num_shards:
        raise UserError(
            f"{data_dir}: {len(folders)} subjects cannot fill {num_shards} data shards (one per process unless "
            f"--config.distributed.data_shards says otherwise); use at most {len(folders)}"
        )
    shard_of = [distributed.subject_shard(number, num_shards) for number in range(len(folders))]
    mine = distributed.owned_shards(num_shards)

    def load() -> list[Subject]:
        subjects = []
        for number, found in enumerate(folders):
            if shard_of[number] not in mine:
                continue
            loaded = load_images(found.inputs, config.data, source=found.name)
            lesion = nifti.load_lesion_mask(found.truth, loaded.reference)
            labelled = _labelled_region(found.truth, config.data, loaded.reference)
            volume = normalise_channels([image.data for image in loaded.images], config.normalisation,
                                        bias_correction=config.bias_correction)
            zooms = tuple(float(z) for z in loaded.reference.nifti.header.get_zooms()[:3])
            subjects.append(Subject(found.name, volume, lesion, channel, number, shard_of[number], zooms, labelled))
        return subjects

    subjects = distributed.agree(load, "loading its training subjects")
    lesion_voxels = np.zeros(num_shards, np.int64)
    for subject in subjects:
        lesion_voxels[subject.shard] += int(subject.sampling_region(subject.lesion).sum())
    lesion_voxels = distributed.allgather(lesion_voxels).sum(axis=0)
    if not lesion_voxels.any():
        raise UserError(f"{data_dir}: no lesion voxels in any subject's lesion mask; nothing to learn from")
    for shard in np.flatnonzero(lesion_voxels == 0):
        names = [found.name for found, s in zip(folders, shard_of) if s == shard]
        raise UserError(
            f"{data_dir}: data shard {shard} of {num_shards} ({', '.join(names)}) has no lesion voxels; "
            "every shard needs some: use fewer --config.distributed.data_shards (or processes)"
        )
    return subjects
