"""`jaxcascade` command line: parse arguments, call library functions, report.

User mistakes (`UserError`) become one line on stderr and exit status 2; faults of the machine
(`MachineFault`, a full disk or quota, memory exhausted: MemoryError or XLA's RESOURCE_EXHAUSTED) one
line and status 3; a study in which some subjects failed exits with 1. A reader that closes the pipe
early (`| head`) ends the command quietly; nothing else is caught, so a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from jaxcascade.errors import (MACHINE_ERRNOS, JaxcascadeWarning, MachineFault, TrainingInterrupted, UserError,
                               out_of_memory)
from jaxcascade.version import __version__

EXIT_USER_ERROR = 2
# A study that ran to its end but could not segment some subjects (their rows say why).
EXIT_SUBJECTS_FAILED = 1
# A fault of the machine (no space left, output folder read-only or gone, out of memory) stopped the work.
EXIT_MACHINE_FAULT = 3


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # '--config.train.x=1' must never be taken for an abbreviation of '--config'.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, not usage + message
        if "required: command" in message:
            commands = ", ".join(self._subparsers._group_actions[0].choices)
            raise UserError(f"choose a command: {commands} (see jaxcascade --help)")
        prefix = "" if self.prog == "jaxcascade" else f"{self.prog}: "
        raise UserError(f"{prefix}{message} (see {self.prog} --help)")


LOGGER = logging.getLogger("jaxcascade")
_QUIET = {"on": False}


def _progress(iterable, description=""):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, disable=True if _QUIET["on"] else None, file=sys.stderr)


def _log(message: str) -> None:
    LOGGER.info(message)


def _warn(message: str) -> None:
    warnings.warn(message, JaxcascadeWarning, stacklevel=2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """jaxcascade's warnings as one line, `jaxcascade: warning: ...`; others as Python shows them."""
    if issubclass(category, JaxcascadeWarning):
        print(f"jaxcascade: warning: {message}", file=sys.stderr, flush=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def configure_output(verbosity: int) -> None:
    """The library logs to the `jaxcascade` logger and warns with JaxcascadeWarning; the command line prints
    the log on stdout (-q: warnings and errors only; -v: debug too) and each warning as one line on stderr."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    LOGGER.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    _QUIET["on"] = verbosity < 0
    # nibabel logs its own lines about a file it rejects; the command line already says it once, naming the file.
    for name in ("nibabel", "nibabel.global"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("always", JaxcascadeWarning)  # a warning about each file, each time
    warnings.showwarning = _show_warning


def parse_inputs(pairs: list[str]) -> dict[str, str]:
    """['T1=a.nii.gz', 'FLAIR=b.nii.gz'] -> {'T1': 'a.nii.gz', 'FLAIR': 'b.nii.gz'}."""
    inputs: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--input {pair!r}: expected NAME=PATH, e.g. --input FLAIR=flair.nii.gz")
        if name in inputs:
            raise UserError(f"--input {name}: modality given twice ({inputs[name]} and {path})")
        inputs[name] = path
    return inputs


class _ScannerNames:
    """--scanner's choices, read from jaxcascade.phantom (numpy, scipy) only when argparse checks a value or
    writes help: a command line that fails on its arguments imports nothing heavy."""

    def _names(self):
        from jaxcascade.phantom import scanners

        return tuple(scanners.SCANNERS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def cmd_phantom(args, _overrides) -> None:
    from jaxcascade.runtime import outputs
    from jaxcascade import phantom

    from jaxcascade.phantom import scanners

    if args.subjects < 1 or args.sessions < 1:
        raise UserError(f"--subjects {args.subjects} --sessions {args.sessions}: need at least one of each")
    outputs.check_output_path(args.out, is_dir=True)
    args.scanner = args.scanner or scanners.DEFAULT.name
    generator, options = phantom, {"scanner": args.scanner}
    if args.kind == "mni":
        from jaxcascade.phantom import mni as generator
    elif args.kind == "synth":
        from jaxcascade.phantom import synth as generator
        if args.scanner != scanners.DEFAULT.name:
            raise UserError(f"--kind synth draws its own acquisition for every subject; drop --scanner {args.scanner}")
        options, args.scanner = {}, "randomised"
    names = generator.write_cohort(args.out, args.subjects, args.seed, args.size, layout=args.layout,
                                   sessions=args.sessions, **options)
    layout = f" as a BIDS dataset ({args.sessions} session{'s' if args.sessions > 1 else ''} each)" \
        if args.layout == "bids" else ""
    _log(f"wrote {len(names)} {args.size} {args.kind} phantom subjects (scanner {args.scanner}) to "
         f"{args.out}{layout}: {', '.join(names)}")


def cmd_train(args, overrides) -> None:
    from jaxcascade import api
    from jaxcascade.data.bids_layout import participant_labels
    from jaxcascade.training.history import read_history

    if args.init_from and args.config:
        from jaxcascade import config as config_lib

        # A recipe's overrides first, so that the user's own overrides win.
        overrides = [*config_lib.load_fine_tuning_recipe(args.config), *overrides]
    _note_without_kernels()
    api.train(args.data, args.workdir, config=args.config or "default", overrides=overrides,
              init_from=args.init_from, participants=participant_labels(args.participant_label), log=_log,
              progress=_progress)
    epochs = {stage: len(records) for stage, records in read_history(Path(args.workdir)).items()}
    _log(f"trained model in {args.workdir} (epochs: stage 1 {epochs[1]}, stage 2 {epochs[2]})")


def cmd_segment(args, _overrides) -> int | None:
    if args.data or args.out_dir:
        return _segment_study(args)
    if not args.input or not args.out:
        raise UserError("jaxcascade segment: give --input NAME=PATH ... --out SEG.nii.gz for one subject, "
                        "or --data DIR --out-dir OUT for a study (see --help)")
    if args.probabilities == "":
        raise UserError("jaxcascade segment --probabilities: give the folder for one subject's maps")
    if args.shard or args.bids_suffix or args.bids_filter or args.participant_label:
        raise UserError("jaxcascade segment: --shard, --participant-label, --bids-suffix and --bids-filter apply "
                        "to a study (--data DIR --out-dir OUT)")
    inputs = parse_inputs(args.input)
    # The inputs are inflated in the background while JAX is imported (`data/prefetch.py`).
    from jaxcascade.data import prefetch

    prefetch.start([*inputs.values(), *([args.brain_mask] if args.brain_mask else [])])
    from jaxcascade import api

    try:
        result = api.segment(
            args.model, inputs, out=args.out, probabilities=args.probabilities,
            threshold=args.threshold, min_lesion_voxels=args.min_lesion_voxels, method=args.inference,
            compute_dtype=args.compute_dtype, min_lesion_volume_mm3=args.min_lesion_volume, tta=args.tta or None,
            brain_mask=args.brain_mask, resample=args.resample, overwrite=args.overwrite, progress=_progress,
            warn=_warn,
        )
    finally:
        prefetch.forget()
    _log(f"{args.out}: {int(result.mask.sum())} lesion voxels "
         f"({result.candidate_count} candidates, {result.stage2_candidate_count} to stage 2)")


def _segment_study(args) -> int:
    if not (args.data and args.out_dir) or args.input or args.out:
        raise UserError("jaxcascade segment: a study takes --data DIR and --out-dir OUT, without --input/--out")
    if args.brain_mask:
        raise UserError("jaxcascade segment --data: --brain-mask is for one subject; in a study each subject's "
                        "mask is brain_mask.nii.gz in its folder (BIDS: a *_desc-brain_mask derivative)")
    if args.probabilities:
        raise UserError("jaxcascade segment --data: --probabilities takes no folder for a study (maps go beside "
                        "each subject's mask)")
    if args.threshold is not None or args.min_lesion_voxels is not None or args.inference:
        raise UserError("jaxcascade segment --data: --threshold, --min-lesion-voxels and --inference apply to one "
                        "subject; for a study set them in the model's config")
    from jaxcascade import api
    from jaxcascade.data import bids_layout
    from jaxcascade.segmentation import study

    _note_without_kernels()
    rows = api.segment_study(args.model, args.data, args.out_dir, probabilities=args.probabilities is not None,
                               overwrite=args.overwrite, compute_dtype=args.compute_dtype,
                               bids_suffixes=bids_layout.parse_suffixes(args.bids_suffix),
                               shard=study.parse_shard(args.shard), tta=args.tta or None,
                               participants=bids_layout.participant_labels(args.participant_label),
                               bids_filters=bids_layout.parse_filters(args.bids_filter),
                               resample=args.resample, min_lesion_volume_mm3=args.min_lesion_volume, log=_log,
                               progress=_progress)
    # Rows marked resumed were finished earlier, or belong to another shard: only this run's failures
    # decide its exit status (a SLURM array task fails for its own subjects).
    this_run = [row for row in rows if not row.get("resumed")]
    failed = [row for row in this_run if row["status"].startswith("error")]
    earlier = [row for row in rows if row.get("resumed") and row["status"] == "ok"]
    others = len(rows) - len(this_run) - len(earlier)
    _log(f"{args.out_dir}: {study.subject_count(rows)}: {len(this_run) - len(failed)} segmented, "
         f"{len(earlier)} already done, {len(failed)} failed" + (" (see lesions.csv)" if failed else "")
         + (f", {others} left to or failed in other shards" if others else "")
         + "; lesions.csv and lesion_table.csv written")
    return EXIT_SUBJECTS_FAILED if failed else 0


def _pairs(flag: str, pairs: list[str] | None) -> dict[str, str]:
    try:
        return parse_inputs(pairs or [])
    except UserError as error:
        raise UserError(str(error).replace("--input", flag)) from None


def cmd_change(args, _overrides) -> None:
    from jaxcascade.longitudinal.pipeline import ChangeOptions
    from jaxcascade.longitudinal.visits import AlignmentOptions
    from jaxcascade.evaluation.change import ChangeCriteria

    options = ChangeOptions(
        alignment=AlignmentOptions(brain_mask=args.brain_mask, match_intensities=not args.no_intensity_matching),
        criteria=ChangeCriteria(min_relative_growth=args.min_growth_percent / 100),
        difference_z=args.difference_z)
    if args.data:
        if args.baseline or args.followup:
            raise UserError("jaxcascade change: --data pairs a study's sessions itself; leave out --baseline/--followup")
        from jaxcascade import api

        rows = api.change_study(args.model, args.data, args.out_dir, options=options,
                                participants=args.participant_label, overwrite=args.overwrite, log=_log)
        failed = sum(row["status"] != "ok" for row in rows)
        _log(f"{args.out_dir}: {len(rows) - failed} of {len(rows)} visit pairs compared (change_summary.csv)")
        return 1 if failed else None
    baseline, followup = _pairs("--baseline", args.baseline), _pairs("--followup", args.followup)
    if not baseline or not followup:
        raise UserError("jaxcascade change: give --baseline NAME=PATH and --followup NAME=PATH for each sequence "
                        "(or --data DIR for a study's sessions); see --help")
    from jaxcascade import api

    run = api.detect_changes(args.model, baseline, followup, out_dir=args.out_dir,
                             baseline_transforms=_pairs("--baseline-transform", args.baseline_transform),
                             followup_transforms=_pairs("--followup-transform", args.followup_transform),
                             options=options, overwrite=args.overwrite)
    summary = run.changes.summary
    _log(f"{args.out_dir}: {summary.new_count} new, {summary.enlarging_count} enlarging lesions "
         f"({summary.new_and_enlarging_volume_ml:.2f} ml new or grown); {summary.disappearing_count} gone, "
         f"{summary.shrinking_count} shrinking, {summary.stable_count} stable")


def cmd_models(args, _overrides) -> None:
    from jaxcascade.storage import shipped

    cards = {name: shipped.card(name) for name in shipped.names()}
    if args.json:
        print(json.dumps(cards, indent=2))
        return
    if not cards:
        print("no shipped models in this installation")
    for name, card in cards.items():
        default = " (used when --model is left out)" if name == shipped.DEFAULT_MODEL else ""
        print(f"{name}{default}: {card['summary']}")
        print(f"  inputs: {', '.join(card['inputs'])}; trained on: {card['training_data']}")
        for row in card.get("accuracy", []):
            print(f"  {row['data']}: DSC {row['dsc']:.2f}, lesion F1 {row['lesion_f1']:.2f}, "
                  f"volume error {row['volume_error_percent']:+.0f} % ({row['protocol']})")
        print(f"  licence: {card['licence']}")


def cmd_evaluate(args, _overrides) -> None:
    from jaxcascade import api
    from jaxcascade.evaluation import metrics
    from jaxcascade.runtime import outputs

    values = api.evaluate(args.pred, args.truth)
    if args.json:
        print(json.dumps(outputs.json_safe(values), indent=2))
    else:
        print(metrics.format_metrics(values))


def cmd_import_keras(args, _overrides) -> None:
    from jaxcascade.storage import interop

    modalities = tuple(name.strip() for name in args.modalities.split(",") if name.strip())
    provenance = interop.import_keras(args.model1, args.model2, modalities, args.out)
    _log(f"wrote model {args.out} (network nicms, channels {','.join(modalities)}) from {provenance['source']}")


def cmd_build_kernels(args, _overrides) -> None:
    from jaxcascade.ops import kernel_build

    built = kernel_build.build_kernels()
    _log(f"built {built['library']}\n  with {built['compiler']}\n  command: {built['command']}")


def cmd_doctor(args, _overrides) -> None:
    from jaxcascade.ops.kernel_report import describe, kernel_report

    report = kernel_report()
    print(json.dumps(report, indent=2) if args.json else f"jaxcascade {__version__}\n{describe(report)}")


def _note_without_kernels() -> None:
    """One line on stderr when a long job computes on the CPU without the C++ kernels (-q silences it)."""
    from jaxcascade.ops.kernel_report import without_kernels_note

    note = without_kernels_note()
    if note and not _QUIET["on"]:
        print(f"jaxcascade: note: {note}", file=sys.stderr, flush=True)


def cmd_demo(args, _overrides) -> None:
    from jaxcascade import demo

    demo.run_demo(args.workdir, log=_log, progress=_progress)


def probability(text: str) -> float:
    """An option's value from 0 to 1; argparse turns the error into its one line naming the option."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a probability, from 0 to 1")
    return value


def voxel_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a number of voxels, 0 or more")
    return value


def volume_mm3(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a volume in mm^3, 0 or more")
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a percentage, 0 or more")
    return value


def _z_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a number of standard deviations, 0 or more, or none")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxcascade", description="Cascaded 3D CNN MS lesion segmentation (Valverde et al. 2017).")
    parser.add_argument("--version", action="version", version=f"jaxcascade {__version__}")
    # -q/-v before or after the command: the command's copies default to "not given", not to 0.
    verbosity = _Parser(add_help=False)
    verbosity.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=argparse.SUPPRESS,
                           help="print warnings and errors only")
    verbosity.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                           default=argparse.SUPPRESS, help="print debugging messages too")
    parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                        help="print warnings and errors only")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                        help="print debugging messages too")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = commands.add_parser
    commands.add_parser = lambda *a, **k: add_parser(*a, parents=[verbosity], **k)

    p = commands.add_parser("phantom", help="write a synthetic MS cohort (T1, FLAIR, lesion mask)",
                            description="Write a synthetic MS cohort: T1, FLAIR and lesion mask of each subject, in "
                                        "one folder per subject (for training) or as a BIDS dataset. Everything is "
                                        "drawn from --seed, so the same command writes the same files.")
    p.add_argument("out", help="output folder (one sub-folder per subject)")
    p.add_argument("--subjects", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--kind", choices=("procedural", "mni", "synth"), default="procedural",
                   help="procedural brain, MNI152 anatomy, or MNI152 anatomy with every tissue contrast, lesion and "
                        "acquisition drawn at random for training models for real scans (mni and synth need "
                        "pip install -e '.[nilearn]')")
    p.add_argument("--layout", choices=("folders", "bids"), default="folders",
                   help="one folder per subject (for training), or a BIDS dataset with lesion masks as a derivative")
    p.add_argument("--sessions", type=int, default=1, help="sessions per subject (BIDS layout)")
    p.add_argument("--scanner", choices=_ScannerNames(), default=None, metavar="NAME",
                   help="acquisition settings: lesion contrast, noise, bias field, FLAIR slices (README, The phantom); "
                        "one of %(choices)s")
    p.set_defaults(run=cmd_phantom)

    p = commands.add_parser("train", help="train both stages (resumes an interrupted run)",
                            description="Train both stages of the cascade on labelled subjects (one folder each, or "
                                        "a BIDS dataset) into --workdir, or fine-tune a model with --init-from. "
                                        "Running the same command again resumes where it stopped.")
    p.add_argument("--data", required=True, help="folder with one sub-folder per subject")
    p.add_argument("--workdir", required=True, help="where the model, checkpoints and metrics go")
    p.add_argument("--config", help="config file with get_config(), or a packaged name: default (the paper's budget), "
                                     "demo (12 epochs), robust (N4, augmentation), synth (domain-randomised phantoms); "
                                     "with --init-from, a fine-tuning recipe such as oneshot. KEY=VALUE overrides "
                                     "follow as --config.train.max_epochs=50")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune a trained, imported or shipped model, e.g. `--init-from default --config oneshot` "
                        "on one labelled subject of your scanner")
    p.add_argument("--participant-label", nargs="+", action="extend", metavar="LABEL",
                   help="train on these participants only (01 or sub-01; folder names in the folder layout)")
    p.set_defaults(run=cmd_train, overrides=True)

    p = commands.add_parser("segment", help="segment one subject, or every subject of a folder, with a trained model",
                            description="Segment MS lesions: one subject (--input NAME=PATH per modality, --out "
                                        "SEG.nii.gz) or a whole study (--data DIR --out-dir OUT: masks, QC pictures, "
                                        "lesions.csv). The mask is written on the FLAIR's own grid, with its header.")
    p.add_argument("--model", help="a train --workdir, an import-keras output or a shipped model's name "
                                    "(`jaxcascade models`); the shipped 'default' if left out")
    p.add_argument("--input", action="append", metavar="NAME=PATH", help="one per modality (one subject)")
    p.add_argument("--out", help="binary mask to write (.nii.gz) (one subject)")
    p.add_argument("--probabilities", nargs="?", const="", metavar="DIR",
                   help="also write stage1/stage2 probability maps (into DIR; for a study, beside each mask)")
    p.add_argument("--brain-mask", metavar="PATH",
                   help="restrict normalisation and candidates to this mask (images that are not skull-stripped)")
    p.add_argument("--data", metavar="DIR", help="a study: one folder per subject, as for training")
    p.add_argument("--out-dir", metavar="OUT", help="a study's outputs: masks, QC pictures, lesions.csv")
    p.add_argument("--shard", metavar="I/N",
                   help="a study split over N processes: this one takes subjects I, I+N, ... ('slurm': the array task)")
    p.add_argument("--bids-suffix", action="append", metavar="NAME=SUFFIX",
                   help="BIDS suffix of a modality (defaults T1=T1w, FLAIR=FLAIR, T2=T2w, PD=PDw)")
    p.add_argument("--participant-label", nargs="+", action="extend", metavar="LABEL",
                   help="a study: only these participants (01 or sub-01), as BIDS Apps take them")
    p.add_argument("--bids-filter", action="append", metavar="[MODALITY:]ENTITY=VALUE",
                   help="BIDS: keep images with this entity where a session has several (e.g. FLAIR:acq=3d, run=1); "
                        "without one, the last run is used and other ambiguities are that session's error")
    p.add_argument("--threshold", type=probability, help="t_bin on CNN2's probability (model's config by default)")
    p.add_argument("--min-lesion-voxels", "--min-lesion-size", dest="min_lesion_voxels", type=voxel_count,
                   metavar="N",
                   help="keep lesions (connected components) of more than N voxels (model's config by default)")
    p.add_argument("--min-lesion-volume", type=volume_mm3, metavar="MM3",
                   help="keep lesions larger than this many mm^3 (instead of --min-lesion-voxels)")
    p.add_argument("--resample", choices=("auto", "never"), default="auto",
                   help="auto: segment inputs of another voxel size at the model's, results on the input's grid")
    p.add_argument("--inference", choices=("auto", "dense", "patch"),
                   help="dense whole-volume kernel (exact; default where the network allows) or patch-wise")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="convolution arithmetic (model's config by default); bfloat16 is faster on GPUs, TPUs, AMX CPUs")
    p.add_argument("--tta", action="store_true",
                   help="average both stages over the 8 axis flips (8x slower); with --probabilities also "
                        "stage2_std.nii.gz, the spread over the flips")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(run=cmd_segment)

    p = commands.add_parser("change", help="new and enlarging lesions between two visits (raw clinical scans)",
                            description="Compare two visits of one patient: each visit's sequences are registered "
                                        "onto its FLAIR and the follow-up onto the baseline, the brain extracted "
                                        "where the FLAIR is not skull-stripped, both visits segmented on one grid, "
                                        "and their lesions matched (new, enlarging, shrinking, disappearing, "
                                        "merging, splitting, stable). --data DIR compares every two consecutive "
                                        "sessions of each participant of a study.")
    p.add_argument("--model", help="a model directory or a shipped model's name; the shipped 'default' if left out")
    p.add_argument("--baseline", action="append", metavar="NAME=PATH", help="one per sequence of the first visit")
    p.add_argument("--followup", action="append", metavar="NAME=PATH", help="one per sequence of the second visit")
    p.add_argument("--baseline-transform", action="append", metavar="NAME=FILE",
                   help="an ITK text transform to use instead of registering: NAME onto the visit's FLAIR, or "
                        "FLAIR=FILE (with --followup-transform FLAIR=...): a common space -> this visit's FLAIR")
    p.add_argument("--followup-transform", action="append", metavar="NAME=FILE", help="as --baseline-transform")
    p.add_argument("--data", metavar="DIR", help="a study (BIDS sessions): every two consecutive sessions")
    p.add_argument("--participant-label", nargs="+", action="extend", metavar="LABEL",
                   help="with --data: only these participants (01 or sub-01)")
    p.add_argument("--out-dir", metavar="OUT", required=True,
                   help="change_mask, new_and_enlarging, both visits' masks, changes.csv, summary.csv, QC picture")
    p.add_argument("--brain-mask", choices=("auto", "extract", "none"), default="auto",
                   help="auto: extract the brain where the baseline FLAIR is not skull-stripped (default)")
    p.add_argument("--min-growth-percent", type=_percent, default=50.0, metavar="P",
                   help="a lesion is enlarging when it grew by P %% of its baseline volume (and by 14.1 mm^3)")
    p.add_argument("--difference-z", type=_z_or_none, default=3.0, metavar="Z",
                   help="a lesion voxel seen at one visit only counts where the FLAIR changed by > Z robust "
                        "standard deviations (default 3; none: the masks alone decide)")
    p.add_argument("--no-intensity-matching", action="store_true",
                   help="do not map the follow-up's intensities onto the baseline's")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    p.set_defaults(run=cmd_change)

    p = commands.add_parser("models", help="list the models that ship with jaxcascade: training data, licence, "
                            "accuracy measured on real scans",
                            description="List the models that ship inside jaxcascade (the names --model and "
                                        "--init-from take), each with what it was trained on, its licence and the "
                                        "accuracy measured on real scans.")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("evaluate", help="compare a segmentation with the truth",
                            description="Score a predicted lesion mask against the true one on the same grid: Dice, "
                                        "precision, recall, volume difference and lesion-wise detection.")
    p.add_argument("--pred", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("import-keras", help="import nicMSlesions' Keras model_1/model_2.hdf5 as a model",
                            description="Convert nicMSlesions' trained Keras networks (model_1.hdf5, model_2.hdf5) "
                                        "into a jaxcascade model directory that segment --model and train "
                                        "--init-from take (needs pip install -e '.[interop]').")
    p.add_argument("--model1", required=True, help="CNN1's Keras HDF5 file (model_1.hdf5)")
    p.add_argument("--model2", required=True, help="CNN2's Keras HDF5 file (model_2.hdf5)")
    p.add_argument("--modalities", required=True, metavar="T1,FLAIR",
                   help="input channel names in the networks' order (nicMSlesions baseline_2ch: T1,FLAIR)")
    p.add_argument("--out", required=True, help="new model directory for `segment --model`")
    p.set_defaults(run=cmd_import_keras)

    p = commands.add_parser("build-kernels", help="build the C++ CPU kernels now (e.g. on a cluster's login node), "
                            "retrying a failed build",
                            description="Build jaxcascade's C++ CPU kernels for this CPU now, retrying a build that "
                                        "failed before. With JAXCASCADE_KERNEL_DIR set, the build serves every node "
                                        "of the same CPU, including nodes without a compiler.")
    p.set_defaults(run=cmd_build_kernels)

    p = commands.add_parser("doctor", help="what this machine gets: CPU class, whether the C++ kernels are built "
                            "and used here (and why not), JAX version and devices",
                            description="Print this CPU's class (AVX-512, AVX2, ARM, other) and the flags found, "
                                        "whether jaxcascade's C++ CPU kernels are built, loaded and used here and "
                                        "why not, and the JAX version and devices. Builds the kernels where they "
                                        "would be used, as a first run would.")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(run=cmd_doctor)

    p = commands.add_parser("demo", help="phantom cohort -> train -> segment a held-out subject -> metrics",
                            description="Run the whole method on a small phantom cohort: write it, train both "
                                        "stages, segment a held-out subject and score it, all in --workdir.")
    p.add_argument("--workdir", default="jaxcascade-demo")
    p.set_defaults(run=cmd_demo)
    return parser


def _hint_input_pairs(inputs: list[str] | None, unknown: list[str]) -> None:
    """`--input T1 t1.nii.gz` leaves 't1.nii.gz' unrecognised: say how to write it rather than that."""
    bare = [value for value in inputs or [] if "=" not in value]
    if bare:
        raise UserError(f"--input {bare[0]} {unknown[0]}: use NAME=PATH, e.g. --input {bare[0]}={unknown[0]}")


# Commands that start JAX: under a small address-space limit they would die in C++ rather than fail in Python.
_COMPUTING_COMMANDS = ("train", "segment", "demo", "import-keras", "change")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        configure_output(args.verbosity)
        if unknown and not getattr(args, "overrides", False):
            _hint_input_pairs(getattr(args, "input", None), unknown)
            raise UserError(f"jaxcascade {args.command}: unrecognised arguments: {' '.join(unknown)} (see --help)")
        if args.command in _COMPUTING_COMMANDS:
            from jaxcascade.runtime import address_space_problem

            problem = address_space_problem()
            if problem is not None:
                raise MachineFault(problem)
        status = args.run(args, unknown) or 0
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted. Point stdout at /dev/null so
        # the interpreter's final flush cannot raise again, and exit as a
        # SIGPIPE-killed tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except UserError as error:
        print(f"jaxcascade: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MachineFault as fault:
        print(f"jaxcascade: error: {fault}", file=sys.stderr)
        return EXIT_MACHINE_FAULT
    except OSError as error:  # a full disk or quota while writing, in any command: one line, not a traceback
        if error.errno not in MACHINE_ERRNOS:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"jaxcascade: error: {error.strerror}{where}; free space (or choose another folder) and run the "
              "command again", file=sys.stderr)
        return EXIT_MACHINE_FAULT
    except KeyboardInterrupt:
        print("jaxcascade: interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as interrupted:  # a scheduler's SIGTERM: saved, resumable
        print(f"jaxcascade: {interrupted}", file=sys.stderr)
        return 128 + interrupted.signum
    except Exception as error:  # noqa: BLE001 - last: memory exhausted is the machine's fault, the rest bugs
        reason = out_of_memory(error)
        if reason is None:
            raise
        print(f"jaxcascade: error: {reason}; close other programs or use a machine with more memory, then run the "
              "command again", file=sys.stderr)
        return EXIT_MACHINE_FAULT
    return status


if __name__ == "__main__":
    sys.exit(main())
