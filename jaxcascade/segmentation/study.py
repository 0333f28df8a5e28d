"""Segmenting a study: every subject (and session) of a data folder with one loaded model, and a report.

For each subject, OUT/<subject>/ (BIDS input: OUT/sub-X/[ses-Y/]anat/, a derivatives dataset) gets
    <prefix>_desc-lesion_mask.nii.gz        on the subject's FLAIR grid, with its header
    <prefix>_desc-stage{1,2}_probseg.nii.gz  with probabilities
    <prefix>_desc-qc.png                    FLAIR with the mask outline on slices spread through the lesions
    <prefix>_desc-lesion_report.json        the subject's row and its lesions (written last)
and OUT/lesions.csv has one row per subject/session (status, count, volume, metrics), OUT/lesion_table.csv
one row per lesion (volume, RAS centroid, probabilities).

The data folder is the training layout (`<subject>/<MODALITY><suffix>`, the lesion file optional) or a
BIDS dataset (`bids_layout.py`). The model is loaded and compiled once: the kernels see volumes padded
to shape buckets, so subjects of different shapes share compilations. A subject whose files fail a
check becomes a row with its one-line error and the others go on. A subject whose report records the
model, settings and inputs of this run is not redone (rerun to resume) unless overwrite; any other is.
The study deletes or overwrites only files it recorded as its own, and refuses a folder that another
tool's dataset_description.json describes (`study_record.py`). Every file is written atomically and
synced, and the CSVs are rebuilt from every report in the folder, so they describe exactly the subjects
finished, whichever participants a run was limited to.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from jaxcascade.data import bids_layout
from jaxcascade.segmentation.cascade import Cascade
from jaxcascade.segmentation.images import segment_images
from jaxcascade.segmentation.options import StudyOptions
from jaxcascade.storage import model_directory, shipped
from jaxcascade.errors import MACHINE_ERRNOS, MachineFault, UserError, out_of_memory
from jaxcascade.runtime.outputs import check_output_path, write_json, write_text
from jaxcascade.data.subjects import find_subjects
from jaxcascade.segmentation import study_record
from jaxcascade.segmentation.study_report import LOCKS, write_tables
from jaxcascade.segmentation.study_subject import (Prefetcher, StudySubject, fit_file_names, load_subject,
                                                  output_names, write_subject)

_LOG = logging.getLogger(__name__)

def study_subjects(data_dir, config, bids_suffixes: dict | None = None, *, participants=None,
                   bids_filters=None, log: Callable | None = None) -> list[StudySubject]:
    """The subjects (and sessions) of a training-layout folder or a BIDS dataset.

    participants: labels (01 or sub-01) to keep, as BIDS Apps' --participant-label; in a training-layout
    folder they name subject folders. bids_filters: `[MODALITY:]ENTITY=VALUE` strings (bids_layout).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data folder not found")
    subjects = _discovered(data_dir, config, bids_suffixes, participants, bids_filters, log)
    # A name too long for a file system gets a shorter one (its start and a hash), said in its report.
    subjects = [fit_file_names(subject) for subject in subjects]
    for subject in subjects:
        if subject.shortened_from and log is not None:
            log(f"{subject.name}: too long for file names; its outputs are named {subject.prefix}_desc-*")
    return subjects


def _discovered(data_dir: Path, config, bids_suffixes, participants, bids_filters, log) -> list[StudySubject]:
    bids = bids_layout.is_bids(data_dir)
    found = find_subjects(data_dir, config.data, strict=False, bids_suffixes=bids_suffixes,
                          participants=participants, bids_filters=bids_filters, log=log)
    return [StudySubject(entry.participant_id, entry.session_id, entry.inputs, entry.truth,
                         *(bids_layout.output_location(entry.participant_id, entry.session_id) if bids
                           else (Path(entry.participant_id), entry.participant_id)),
                         problem=entry.problem, brain_mask=entry.brain_mask) for entry in found]


def subject_count(rows: list[dict]) -> str:
    """How many subjects the rows are: 'N subjects', or 'N sessions of M participants' where they are BIDS
    sessions (2 participants scanned twice are 4 rows, not 4 subjects)."""
    if not any(row.get("session_id") for row in rows):
        return f"{len(rows)} subjects"
    participants = len({row["participant_id"] for row in rows})
    return (f"{len(rows)} session{'s' if len(rows) != 1 else ''} of {participants} "
            f"participant{'s' if participants != 1 else ''}")


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
    """'I/N' (0 <= I < N), 'slurm' (this SLURM array task of the array), or None: (0, 1)."""
    if not text:
        return 0, 1
    if text == "slurm":
        if "SLURM_ARRAY_TASK_ID" not in environ:
            raise UserError("shard='slurm': SLURM_ARRAY_TASK_ID is not set (run it as a job array, sbatch --array)")
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(environ.get("SLURM_ARRAY_TASK_COUNT") or int(environ["SLURM_ARRAY_TASK_MAX"]) - first + 1)
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, count
    index, sep, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise UserError(f"shard={text!r}: expected 'I/N' with 0 <= I < N (e.g. shard='0/4'), or 'slurm'")
    return shard




def machine_fault(error: BaseException, out_dir: Path) -> str | None:
    """What went wrong, if `error` is a fault of the machine or of the output folder rather than of a subject."""
    if out_of_memory(error):
        return out_of_memory(error)
    if not isinstance(error, OSError):
        return None
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in MACHINE_ERRNOS:
        return MACHINE_ERRNOS[error.errno] + where
    written = error.filename and Path(os.path.abspath(error.filename)).is_relative_to(os.path.abspath(out_dir))
    if written and error.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
        return f"cannot write {error.filename} ({error.strerror}): the output folder is not writable or was removed"
    return None


def _claim(out_dir: Path, subject: StudySubject):
    """A lock on the subject for this process, or None if another process holds it (it is segmenting it)."""
    from filelock import FileLock, Timeout

    (out_dir / LOCKS).mkdir(exist_ok=True)
    # Released by the thread that writes the subject, not the one that claimed it.
    lock = FileLock(out_dir / LOCKS / f"{subject.prefix}.lock", thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _error_report(subject: StudySubject, message: str) -> dict:
    return {"row": {"participant_id": subject.participant_id, "session_id": subject.session_id,
                    "status": f"error: {message}"}, "lesions": []}


def _failure(error: Exception, subject: StudySubject, out_dir: Path) -> dict:
    """The error row of a subject that failed unexpectedly; its traceback goes to OUT/logs/<prefix>.log."""
    name = _log_name(subject)
    first = (str(error).strip().splitlines() or [""])[0]
    if study_record.foreign(out_dir, _key(subject), [name]) is not None:  # someone else's file: kept
        return _error_report(subject, f"{type(error).__name__}: {first}")
    study_record.claim(out_dir, _key(subject), [name])
    (out_dir / name).parent.mkdir(exist_ok=True)
    write_text("".join(traceback.format_exception(error)), out_dir / name)
    return _error_report(subject, f"{type(error).__name__}: {first} (details in {name})")


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every subject of one study run shares."""

    model: Cascade
    out_dir: Path
    options: StudyOptions
    log: Callable
    progress: Callable | None
    loader: Prefetcher  # loads the next subject while one computes
    writer: ThreadPoolExecutor  # writes the previous subject's files while one computes


def segment_study(model_dir, data_dir, out_dir, options: StudyOptions = StudyOptions(), *,
                  log: Callable = _LOG.info, progress: Callable | None = None) -> list[dict]:
    """Segment every subject of data_dir into out_dir; returns the subject rows (also in OUT/lesions.csv).

    With options.shard (i, n), this process segments subjects i, i + n, ... and reports the others as far as
    their own processes have finished them; the last process to finish (or a plain rerun, which
    segments nothing new) writes the complete CSVs. No scheduler: a SLURM array or n shell jobs.
    Processes started on one out_dir without shards share the work: each claims a subject with a lock
    before segmenting it, so every subject is done once. A subject that fails in any way becomes an
    error row (unexpected errors: traceback in OUT/logs/); a fault of the machine (`machine_fault`)
    raises MachineFault, with every finished subject kept. Rows finished earlier, by another shard or
    by another process carry `resumed` (not a CSV column). The CSVs also keep the rows of subjects
    this run left out (other participants), as their reports in out_dir say.
    """
    out_dir = _checked_out_dir(out_dir, data_dir)
    model_dir = shipped.locate(model_dir)
    model = Cascade.from_model(model_directory.open_model(model_dir), compute_dtype=options.compute_dtype)
    subjects = study_subjects(data_dir, model.config, options.bids_suffixes, participants=options.participants,
                              bids_filters=options.bids_filters, log=log)
    # What each subject's result is made from: a report that records anything else is stale.
    model_hash = study_record.model_identity(model_dir)
    identities = [study_record.subject_identity(model_hash, options.identity(), _input_files(subject))
                  for subject in subjects]
    run = _Run(model, out_dir, options, log, progress, Prefetcher(functools.partial(load_subject, model)),
               ThreadPoolExecutor(1, thread_name_prefix="jaxcascade-write"))
    reports, report_paths = [], [_report_path(out_dir, subject) for subject in subjects]
    current = None  # the subject being segmented or written when a fault stops the study
    try:
        out_dir.mkdir(exist_ok=True)
        if bids_layout.is_bids(data_dir):
            bids_layout.describe_derivatives(out_dir, Path(data_dir))
        writing = None
        for number, subject in enumerate(progress(subjects, "subjects") if progress else subjects):
            current = subject
            reports.append(_study_subject(run, subjects, identities, number))
            if isinstance(reports[-1], Future):
                # The previous subject's files were written while this one computed; wait for them
                # before the next, so that at most two subjects' arrays are held.
                if writing is not None:
                    current = subjects[writing]
                    reports[writing] = reports[writing].result()
                writing = number
        for number, outcome in enumerate(reports):
            if isinstance(outcome, Future):
                current = subjects[number]
                reports[number] = outcome.result()
        return write_tables(out_dir, reports, report_paths)
    except Exception as error:
        _stop_on_fault(error, run, current, reports, report_paths)
        raise
    finally:
        run.loader.close()
        run.writer.shutdown(wait=True)


def _checked_out_dir(out_dir, data_dir) -> Path:
    """out_dir, refused where it is the data folder or another tool's."""
    out_dir = check_output_path(out_dir, is_dir=True)
    if Path(data_dir).is_dir() and out_dir.is_dir() and out_dir.resolve() == Path(data_dir).resolve():
        raise UserError(f"{out_dir}: is data_dir=... itself; outputs would mix with the subjects' files: choose "
                        "another out_dir=... (for BIDS data, e.g. DATA/derivatives/jaxcascade)")
    if out_dir.is_dir():
        study_record.check_out_dir(out_dir)
    return out_dir


def _stop_on_fault(error: Exception, run: _Run, current, reports: list, report_paths: list) -> None:
    """A MachineFault keeping every finished subject (and the tables of them) where error is a fault of
    the machine; otherwise nothing (the error goes on as it is)."""
    fault = machine_fault(error, run.out_dir)
    if fault is None:
        return
    run.writer.shutdown(wait=True)  # what is being written finishes (or fails) before the tables
    settled = [(report, path) for report, path in zip(map(_settled, reports), report_paths) if report]
    finished = subject_count([report["row"] for report, _ in settled if report["row"]["status"] == "ok"])
    name = current.name if current else str(run.out_dir)
    try:  # the tables of what is finished, if there is room for them
        write_tables(run.out_dir, [report for report, _ in settled], [path for _, path in settled])
    except Exception:  # noqa: BLE001 - the fault at hand is what the user needs to read
        pass
    raise MachineFault(f"{name}: {fault}; stopped with {finished} finished and kept in {run.out_dir}: "
                       "fix it and run the same command again to continue") from None


def _input_files(subject: StudySubject) -> dict:
    return {**subject.inputs, "truth": subject.truth, "brain_mask": subject.brain_mask}


def _key(subject: StudySubject) -> str:
    return study_record.subject_key(subject.folder, subject.prefix)


def _report_path(out_dir: Path, subject: StudySubject) -> Path:
    return out_dir / subject.folder / f"{subject.prefix}_desc-lesion_report.json"


def _error_name(subject: StudySubject) -> str:
    return (subject.folder / f"{subject.prefix}_desc-lesion_error.json").as_posix()


def _log_name(subject: StudySubject) -> str:
    return f"logs/{subject.prefix}.log"


def _finished(report_path: Path, identity: dict) -> dict | None:
    """The subject's report if it is finished from exactly what this run would segment it from, else None."""
    report = study_record.read_report(report_path)
    if report is None or report["row"]["status"] != "ok" or report.get("identity") != identity:
        return None
    return report


def _next_to_segment(subjects: list, identities: list, number: int, shard: tuple[int, int], out_dir: Path,
                     overwrite: bool) -> StudySubject | None:
    """The subject after subjects[number] that this process will segment (to load it early), if any."""
    index, count = shard
    for later in range(number + 1, len(subjects)):
        if later % count == index:
            subject = subjects[later]
            wanted = overwrite or _finished(_report_path(out_dir, subject), identities[later]) is None
            return subject if wanted and not subject.problem else None
    return None


def _settled(outcome) -> dict | None:
    """A subject's report, or None for one whose writing failed or never finished."""
    if not isinstance(outcome, Future):
        return outcome
    return outcome.result() if outcome.done() and outcome.exception() is None else None


def _resumed(report: dict) -> dict:
    report["row"]["resumed"] = True  # finished by an earlier run or another process (not a CSV column)
    return report


def _study_subject(run: _Run, subjects: list[StudySubject], identities: list[dict], number: int) -> dict | Future:
    """subjects[number]'s report: read back if finished (or not this process's), else segmented now, its
    files then written by `run.writer` (a Future of the report) while the caller goes on to the next."""
    subject, identity, out_dir = subjects[number], identities[number], run.out_dir
    report_path, overwrite, (index, count) = _report_path(out_dir, subject), run.options.overwrite, run.options.shard
    mine, log = number % count == index, run.log
    finished = _finished(report_path, identity)
    if finished is not None and not (overwrite and mine):
        return _resumed(finished)
    if not mine:
        return _resumed(_other_shards(subject, identity, out_dir, f"pending: shard {number % count}/{count}"))
    claim = _claim(out_dir, subject)
    if claim is None:
        log(f"{subject.name}: being segmented by another process; left to it")
        return {"row": {"participant_id": subject.participant_id, "session_id": subject.session_id,
                        "status": "pending: another process", "resumed": True, "in_progress": True}, "lesions": []}
    handed_over = False
    try:
        finished = _finished(report_path, identity)
        if finished is not None and not overwrite:  # finished by another process since we looked
            return _resumed(finished)
        names = [(subject.folder / name).as_posix()
                 for name in output_names(subject.prefix, run.options.probabilities)]
        # Its record too: a run killed while writing it left a temporary beside it.
        study_record.remove_temporaries(out_dir, [*names, _error_name(subject), _log_name(subject),
                                                  study_record.record_name(_key(subject))])
        try:
            # Whatever an earlier attempt left (stale, failed or to overwrite) goes before the new one starts.
            study_record.remove_owned(out_dir, _key(subject))
            study_record.claim(out_dir, _key(subject), names)
            loaded = run.loader.take(subject)
            run.loader.prefetch(_next_to_segment(subjects, identities, number, run.options.shard, out_dir, overwrite))
            result = segment_images(run.model, loaded.images, run.options.segment, brain_mask=loaded.brain_mask,
                                    warn=log, progress=run.progress)
        except Exception as error:  # noqa: BLE001 - sorted by _failed: a subject's error or a fault
            return _settle(_failed(error, subject, out_dir, log), subject, identity, out_dir, report_path, log)

        def write() -> dict:
            try:
                try:
                    report = write_subject(subject, loaded, result, out_dir / subject.folder,
                                           run.options.probabilities)
                except Exception as error:  # noqa: BLE001 - as above
                    report = _failed(error, subject, out_dir, log)
                return _settle(report, subject, identity, out_dir, report_path, log)
            finally:
                claim.release()

        future = run.writer.submit(write)
        handed_over = True
        return future
    finally:
        if not handed_over:
            claim.release()


def _other_shards(subject: StudySubject, identity: dict, out_dir: Path, pending: str) -> dict:
    """The outcome of a subject another shard segments: its failure if recorded (a failure is recorded apart
    from the report: other shards read it, its own shard retries it), else pending."""
    other = study_record.read_report(out_dir / _error_name(subject))
    if other is None or other.get("identity") != identity:
        other = {"row": {"participant_id": subject.participant_id, "session_id": subject.session_id,
                         "status": pending}, "lesions": []}
    return other


def _failed(error: Exception, subject: StudySubject, out_dir: Path, log) -> dict:
    """The error report of a subject that failed; a fault of the machine is raised instead."""
    if isinstance(error, UserError):
        log(f"{subject.name}: {error}")
        return _error_report(subject, str(error))
    if machine_fault(error, out_dir):
        raise error
    report = _failure(error, subject, out_dir)
    log(f"{subject.name}: {report['row']['status'][len('error: '):]}")
    return report


def _settle(report: dict, subject: StudySubject, identity: dict, out_dir: Path, report_path: Path, log) -> dict:
    """Record a subject's outcome: its report (written last: a subject without one is redone) or, for a
    failure, its error record alone."""
    report["identity"] = identity
    key, error_name = _key(subject), _error_name(subject)
    if report["row"]["status"] != "ok":
        # Whatever this attempt wrote goes: a failed subject leaves its error record (and log) only.
        study_record.remove_owned(out_dir, key, keep=(error_name, _log_name(subject)))
        if study_record.foreign(out_dir, key, [error_name]) is None:
            study_record.claim(out_dir, key, [error_name])
            (out_dir / subject.folder).mkdir(parents=True, exist_ok=True)
            write_json(report, out_dir / error_name)
        return report
    write_json(report, report_path)
    row = report["row"]
    log(f"{subject.name}: {row['lesion_count']} lesions, {row['lesion_volume_ml']:.2f} ml ({row['seconds']:.1f} s)"
        + ("; the FLAIR does not look skull-stripped: add a brain mask" if row["skull_stripped"] == "no" else "")
        + (f"; {row['resampled']}" if row.get("resampled") else "")
        + (f"; {row['scoring']}" if row.get("scoring") else ""))
    return report
