"""`jaxcascade phantom` and `jaxcascade demo`: synthetic cohorts, and the whole method on one."""

from __future__ import annotations

from jaxcascade.errors import UserError
from jaxcascade.commands.output import log, progress
from jaxcascade.commands.arguments import ScannerNames


def add_phantom(commands) -> None:
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
    p.add_argument("--scanner", choices=ScannerNames(), default=None, metavar="NAME",
                   help="acquisition settings: lesion contrast, noise, bias field, FLAIR slices (README, The phantom); "
                        "one of %(choices)s")
    p.set_defaults(run=cmd_phantom)


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
    log(f"wrote {len(names)} {args.size} {args.kind} phantom subjects (scanner {args.scanner}) to "
         f"{args.out}{layout}: {', '.join(names)}")


def add_demo(commands) -> None:
    p = commands.add_parser("demo", help="phantom cohort -> train -> segment a held-out subject -> metrics",
                            description="Run the whole method on a small phantom cohort: write it, train both "
                                        "stages, segment a held-out subject and score it, all in --workdir.")
    p.add_argument("--workdir", default="jaxcascade-demo")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args, _overrides) -> None:
    from jaxcascade import demo

    demo.run_demo(args.workdir, log=log, progress=progress)
