"""`jaxcascade change`: new and enlarging lesions between two visits, or every pair of a study's sessions."""

from __future__ import annotations

from jaxcascade.commands import EXIT_SUBJECTS_FAILED
from jaxcascade.errors import UserError
from jaxcascade.commands.arguments import named_pairs, percent, z_or_none
from jaxcascade.commands.output import log


def add_change(commands) -> None:
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
    p.add_argument("--bids-suffix", action="append", metavar="NAME=SUFFIX",
                   help="with --data: BIDS suffix of a sequence (defaults T1=T1w, FLAIR=FLAIR, T2=T2w, PD=PDw)")
    p.add_argument("--bids-filter", action="append", metavar="[MODALITY:]ENTITY=VALUE",
                   help="with --data: keep images with this entity where a session has several (as segment's)")
    p.add_argument("--out-dir", metavar="OUT", required=True,
                   help="change_mask, new_and_enlarging, both visits' masks, changes.csv, summary.csv, QC picture")
    p.add_argument("--brain-mask", choices=("auto", "extract", "none"), default="auto",
                   help="auto: extract the brain where the baseline FLAIR is not skull-stripped (default)")
    p.add_argument("--min-growth-percent", type=percent, default=50.0, metavar="P",
                   help="a lesion is enlarging when it grew by P %% of its baseline volume (and by 14.1 mm^3)")
    p.add_argument("--difference-z", type=z_or_none, default=3.0, metavar="Z",
                   help="a lesion voxel seen at one visit only counts where the FLAIR changed by > Z robust "
                        "standard deviations (default 3; none: the masks alone decide)")
    p.add_argument("--no-intensity-matching", action="store_true",
                   help="do not map the follow-up's intensities onto the baseline's")
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    p.set_defaults(run=cmd_change)


def cmd_change(args, _overrides) -> None:
    from jaxcascade.longitudinal.pipeline import ChangeOptions
    from jaxcascade.longitudinal.visits import AlignmentOptions
    from jaxcascade.evaluation.change import ChangeCriteria

    options = ChangeOptions(
        alignment=AlignmentOptions(brain_mask=args.brain_mask, match_intensities=not args.no_intensity_matching),
        criteria=ChangeCriteria(min_relative_growth=args.min_growth_percent / 100),
        difference_z=args.difference_z)
    if not args.data and (args.participant_label or args.bids_suffix or args.bids_filter):
        raise UserError("jaxcascade change: --participant-label, --bids-suffix and --bids-filter apply to a study "
                        "(--data DIR)")
    if args.data:
        if args.baseline or args.followup:
            raise UserError("jaxcascade change: --data pairs a study's sessions itself; leave out --baseline/--followup")
        from jaxcascade import api

        from jaxcascade.data import bids_layout

        rows = api.change_study(args.model, args.data, args.out_dir, options=options,
                                participants=bids_layout.participant_labels(args.participant_label),
                                bids_suffixes=bids_layout.parse_suffixes(args.bids_suffix),
                                bids_filters=args.bids_filter, overwrite=args.overwrite,
                                log=log)
        failed = sum(row["status"] != "ok" for row in rows)
        log(f"{args.out_dir}: {len(rows) - failed} of {len(rows)} visit pairs compared (change_summary.csv)")
        return EXIT_SUBJECTS_FAILED if failed else None
    baseline, followup = named_pairs("--baseline", args.baseline), named_pairs("--followup", args.followup)
    if not baseline or not followup:
        raise UserError("jaxcascade change: give --baseline NAME=PATH and --followup NAME=PATH for each sequence "
                        "(or --data DIR for a study's sessions); see --help")
    from jaxcascade import api

    run = api.detect_changes(args.model, baseline, followup, out_dir=args.out_dir,
                             baseline_transforms=named_pairs("--baseline-transform", args.baseline_transform),
                             followup_transforms=named_pairs("--followup-transform", args.followup_transform),
                             options=options, overwrite=args.overwrite)
    summary = run.changes.summary
    log(f"{args.out_dir}: {summary.new_count} new, {summary.enlarging_count} enlarging lesions "
         f"({summary.new_and_enlarging_volume_ml:.2f} ml new or grown); {summary.disappearing_count} gone, "
         f"{summary.shrinking_count} shrinking, {summary.stable_count} stable")
