"""`jaxcascade segment`: one subject (--input, --out) or a whole study (--data, --out-dir)."""

from __future__ import annotations

from jaxcascade.commands import EXIT_SUBJECTS_FAILED
from jaxcascade.errors import UserError
from jaxcascade.commands.arguments import parse_inputs, probability, volume_mm3, voxel_count
from jaxcascade.commands.output import log, note_without_kernels, progress, warn


def add_segment(commands) -> None:
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
    p.add_argument("--thick-slices", choices=("auto", "on", "off"), default="auto",
                   help="the model's thick-slice settings: auto applies them to a FLAIR with slices at least as "
                        "thick as the model's config says (the default model: 3 mm)")
    p.add_argument("--inference", choices=("auto", "dense", "patch"),
                   help="dense whole-volume kernel (exact; default where the network allows) or patch-wise")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="convolution arithmetic (model's config by default); bfloat16 is faster on GPUs, TPUs, AMX CPUs")
    p.add_argument("--tta", action="store_true",
                   help="average both stages over the 8 axis flips (8x slower); with --probabilities also "
                        "stage2_std.nii.gz, the spread over the flips")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(run=cmd_segment)


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
            brain_mask=args.brain_mask, resample=args.resample, thick_slices=args.thick_slices,
            overwrite=args.overwrite, progress=progress,
            warn=warn,
        )
    finally:
        prefetch.forget()
    log(f"{args.out}: {int(result.mask.sum())} lesion voxels "
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

    note_without_kernels()
    rows = api.segment_study(args.model, args.data, args.out_dir, probabilities=args.probabilities is not None,
                             overwrite=args.overwrite, compute_dtype=args.compute_dtype,
                             bids_suffixes=bids_layout.parse_suffixes(args.bids_suffix), shard=args.shard,
                             tta=args.tta or None, participants=args.participant_label,
                             bids_filters=args.bids_filter, resample=args.resample, thick_slices=args.thick_slices,
                             min_lesion_volume_mm3=args.min_lesion_volume, log=log, progress=progress)
    # Rows marked resumed were finished earlier, or belong to another shard: only this run's failures
    # decide its exit status (a SLURM array task fails for its own subjects).
    this_run = [row for row in rows if not row.get("resumed")]
    failed = [row for row in this_run if row["status"].startswith("error")]
    earlier = [row for row in rows if row.get("resumed") and row["status"] == "ok"]
    others = len(rows) - len(this_run) - len(earlier)
    log(f"{args.out_dir}: {study.subject_count(rows)}: {len(this_run) - len(failed)} segmented, "
         f"{len(earlier)} already done, {len(failed)} failed" + (" (see lesions.csv)" if failed else "")
         + (f", {others} left to or failed in other shards" if others else "")
         + "; lesions.csv and lesion_table.csv written")
    return EXIT_SUBJECTS_FAILED if failed else 0
