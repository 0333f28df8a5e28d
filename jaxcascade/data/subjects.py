"""Training subjects from a data folder: discovery, loading, normalisation, and each process's share.

A data folder holds one folder per subject with `<MODALITY><suffix>` for every
config.data.modalities and `<lesion><suffix>`, or is a BIDS dataset
(`bids_layout`): each session with a lesion mask is then a subject named
sub-X_ses-Y, its modalities found through config.data.bids_suffixes.
Subjects are numbered in sorted name order; the number seeds the subject's sampling and decides its
data shard (`batching`), so a subject is treated the same whichever process
loads it.
"""

from __future__ import annotations

import dataclasses
import os
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


def discover_subjects(data_dir: str | os.PathLike, required_files: list[str]) -> list[Path]:
    """Subject folders of data_dir, each required to hold all required_files."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: training data folder not found")
    subjects = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subjects:
        raise UserError(f"{data_dir}: no subject folders (expected {data_dir}/<subject>/{required_files[0]} ...)")
    incomplete = []
    for subject in subjects:
        absent = [name for name in required_files if not (subject / name).exists()]
        if absent:
            incomplete.append(f"{subject.name} lacks {', '.join(absent)}")
    if incomplete:
        raise UserError(f"{data_dir}: incomplete subjects: {'; '.join(incomplete)}")
    return subjects


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


def training_files(data_dir, data_config, participants=None) -> list[tuple[str, dict, Path]]:
    """(name, {modality: file}, lesion file) of every training subject, in either layout, sorted by name.

    data_config is a config's `data` block; participants, if given, the labels to keep (01 or sub-01;
    in the folder layout, folder names).
    """
    modalities = tuple(data_config.modalities)
    if bids_layout.is_bids(data_dir):
        suffixes = bids_layout.parse_suffixes(data_config.get("bids_suffixes", ""))
        return sorted(bids_layout.training_sessions(data_dir, modalities, suffixes, participants=participants),
                      key=lambda entry: entry[0])
    suffix, lesion_name = data_config.suffix, data_config.lesion
    folders = discover_subjects(data_dir, [f"{m}{suffix}" for m in modalities] + [f"{lesion_name}{suffix}"])
    folders = select_participants(folders, participants, data_dir)
    return [(folder.name, {m: folder / f"{m}{suffix}" for m in modalities}, folder / f"{lesion_name}{suffix}")
            for folder in folders]


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
    folders = training_files(data_dir, config.data, participants)
    if len(folders) < num_shards:
        raise UserError(
            f"{data_dir}: {len(folders)} subjects cannot fill {num_shards} data shards (one per process unless "
            f"--config.distributed.data_shards says otherwise); use at most {len(folders)}"
        )
    shard_of = [distributed.subject_shard(number, num_shards) for number in range(len(folders))]
    mine = distributed.owned_shards(num_shards)

    def load() -> list[Subject]:
        subjects = []
        for number, (name, inputs, lesion_file) in enumerate(folders):
            if shard_of[number] not in mine:
                continue
            images = nifti.load_sequences(inputs, modalities, name,
                                          orientation=config.data.orientation, reference=config.data.flair)
            lesion = nifti.load_lesion_mask(lesion_file, images[channel])
            labelled = _labelled_region(lesion_file, config.data, images[channel])
            volume = normalise_channels([image.data for image in images], config.normalisation,
                                        bias_correction=config.bias_correction)
            zooms = tuple(float(z) for z in images[channel].nifti.header.get_zooms()[:3])
            subjects.append(Subject(name, volume, lesion, channel, number, shard_of[number], zooms, labelled))
        return subjects

    subjects = distributed.agree(load, "loading its training subjects")
    lesion_voxels = np.zeros(num_shards, np.int64)
    for subject in subjects:
        lesion_voxels[subject.shard] += int(subject.sampling_region(subject.lesion).sum())
    lesion_voxels = distributed.allgather(lesion_voxels).sum(axis=0)
    if not lesion_voxels.any():
        raise UserError(f"{data_dir}: no lesion voxels in any subject's lesion mask; nothing to learn from")
    for shard in np.flatnonzero(lesion_voxels == 0):
        names = [entry[0] for entry, s in zip(folders, shard_of) if s == shard]
        raise UserError(
            f"{data_dir}: data shard {shard} of {num_shards} ({', '.join(names)}) has no lesion voxels; "
            "every shard needs some: use fewer --config.distributed.data_shards (or processes)"
        )
    return subjects
