"""One subject of a study in three steps that a pipeline can overlap: load, segment, write.

`segment_study` (study.py) segments subject k on the calling thread while one worker thread loads
subject k+1 (`Prefetcher`) and another writes subject k-1's files, lesion table and QC picture
(`write_subject`). The segmentation keeps every core busy most of the time, but not all of it
(padding, transfers, the host-side parts of each stage); reading gzip and drawing fill those gaps,
and on machines with more cores than XLA keeps busy they come for free. At most one subject is being
loaded and one written beside the one computing, so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade.data import nifti
from jaxcascade.data.subjects import load_images
from jaxcascade.evaluation import metrics, plots
from jaxcascade.segmentation.cascade import Cascade, PhaseClock, Segmentation
from jaxcascade.segmentation.study_report import lesion_rows
from jaxcascade.errors import UserError
from jaxcascade.runtime.outputs import fitting_prefix


@dataclasses.dataclass
class StudySubject:
    participant_id: str
    session_id: str  # "" without sessions
    inputs: dict  # modality -> Path
    truth: Path | None  # a lesion mask to score against, if any
    folder: Path  # outputs, relative to OUT
    prefix: str  # of every output file name
    problem: str | None = None  # a reason it cannot be segmented, found while discovering
    brain_mask: Path | None = None  # restricts normalisation and candidates
    shortened_from: str = ""  # the prefix its name gave, where too long for a file name (prefix: shortened)

    @property
    def name(self) -> str:
        return " ".join(part for part in (self.participant_id, self.session_id) if part)


@dataclasses.dataclass
class LoadedSubject:
    images: list  # nifti.Image per model modality
    reference: nifti.Image  # the FLAIR: outputs go on its grid
    resampled: list[str]  # notes on sequences brought onto the FLAIR's grid
    brain_mask: np.ndarray | None
    skull_stripped: str
    truth: np.ndarray | None
    seconds: float  # spent loading
    scoring: str = ""  # how the lesion mask was read, or why the subject is not scored


def load_subject(model: Cascade, subject: StudySubject) -> LoadedSubject:
    """Read and check a subject's files (UserError naming the file for any problem)."""
    started = time.perf_counter()
    if subject.problem:
        raise UserError(subject.problem)
    files = load_images(subject.inputs, model.config.data, brain_mask=subject.brain_mask,
                        source=subject.participant_id)
    truth, scoring = None, ""
    if subject.truth:
        # Scoring never blocks segmenting: a mask that cannot be read is said in the report, and not scored.
        try:
            truth, scoring = nifti.read_lesion_mask(subject.truth, files.reference)
        except UserError as error:
            scoring = f"not scored: {error}"
    return LoadedSubject(files.images, files.reference, files.resampled, files.brain_mask, files.skull_stripped, truth,
                         time.perf_counter() - started, scoring)


def fit_file_names(subject: StudySubject) -> StudySubject:
    """The subject, its prefix shortened with a hash where its longest output name would pass 255 bytes."""
    longest = max(len(name.encode()) for name in [*output_names("", True), "_desc-lesion_error.json"])
    prefix = fitting_prefix(subject.prefix, longest)
    if prefix != subject.prefix:
        subject = dataclasses.replace(subject, prefix=prefix, shortened_from=subject.prefix)
    return subject


def output_names(prefix: str, probabilities: bool) -> list[str]:
    """Every file a subject's segmentation may write (`write_subject`, then the study's report), by name."""
    maps = ("stage1_probseg.nii.gz", "stage2_probseg.nii.gz", "stage2std_probseg.nii.gz") if probabilities else ()
    return [f"{prefix}_desc-{desc}" for desc in ("lesion_mask.nii.gz", *maps, "qc.png", "lesion_report.json")]


def write_subject(subject: StudySubject, loaded: LoadedSubject, result: Segmentation, out: Path,
                  probabilities: bool) -> dict:
    """Write a segmented subject's files into out; its report: row, lesions, seconds per phase."""
    clock = PhaseClock()
    reference = loaded.reference
    out.mkdir(parents=True, exist_ok=True)
    nifti.save_like(result.mask, reference, out / f"{subject.prefix}_desc-lesion_mask.nii.gz", dtype=np.uint8)
    if probabilities:
        for stage, values in ((1, result.stage1_probability), (2, result.stage2_probability)):
            nifti.save_like(values, reference, out / f"{subject.prefix}_desc-stage{stage}_probseg.nii.gz",
                            dtype=np.float32)
        if result.stage2_std is not None:
            nifti.save_like(result.stage2_std, reference, out / f"{subject.prefix}_desc-stage2std_probseg.nii.gz",
                            dtype=np.float32)
    clock.lap("write")
    lesions = lesion_rows(result.mask, result.stage2_probability, reference)
    volume_ml = float(result.mask.sum()) * reference.voxel_volume_ml
    row = {"participant_id": subject.participant_id, "session_id": subject.session_id, "status": "ok",
           "lesion_count": len(lesions), "lesion_volume_ml": round(volume_ml, 6),
           "voxel_size_mm": "x".join(f"{z:g}" for z in reference.nifti.header.get_zooms()[:3]),
           "skull_stripped": loaded.skull_stripped, "resampled": "; ".join(loaded.resampled),
           "thick_slices": "yes" if result.thick_slices else "no", "scoring": loaded.scoring}
    if loaded.truth is not None:
        scores = metrics.segmentation_metrics(result.mask, loaded.truth, reference.voxel_volume_ml)
        # The volume error beside DSC: a mask can overlap well and still miss half the lesion load.
        row.update({key: round(scores[key], 5) for key in ("dsc", "ppv", "tpr", "lesion_f1")},
                   volume_error_percent=round(100.0 * scores["rvd"], 2), true_volume_ml=round(scores["truth_volume_ml"], 6))
    clock.lap("lesion_table")
    title = f"{subject.prefix}: {len(lesions)} lesions, {volume_ml:.2f} ml"
    plots.overlay(reference.data, loaded.truth, result.mask, out / f"{subject.prefix}_desc-qc.png", title=title)
    clock.lap("qc_picture")
    seconds = {"load": loaded.seconds, **result.seconds, **clock.seconds}
    # A subject's own work; in a pipeline its steps overlap its neighbours', so these add up to more
    # than the study's wall time per subject (`finished`, a wall-clock time stamp, gives the rate).
    row["seconds"] = round(sum(seconds.values()), 3)
    report = {"row": row, "lesions": lesions, "seconds": {phase: round(s, 4) for phase, s in seconds.items()},
              "finished": time.time()}
    if subject.shortened_from:
        report["file_prefix"] = {"used": subject.prefix, "shortened_from": subject.shortened_from}
    return report


class Prefetcher:
    """Loads the next subject on a worker thread while the current one computes; errors surface at `take`."""

    def __init__(self, load: Callable[[StudySubject], LoadedSubject]):
        self._load = load
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxcascade-load")
        self._pending: tuple[StudySubject, Future] | None = None

    def prefetch(self, subject: StudySubject | None) -> None:
        if subject is not None and self._pending is None:
            self._pending = (subject, self._pool.submit(self._load, subject))

    def take(self, subject: StudySubject) -> LoadedSubject:
        """subject's loaded files: the prefetched ones if they are this subject's, else loaded now."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is subject:
            return pending[1].result()
        return self._load(subject)

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
