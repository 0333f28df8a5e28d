"""`models`, `evaluate`, `build-kernels` and `doctor`: what ships, how a mask scores, what this machine gets."""

from __future__ import annotations

import json

from jaxcascade.version import __version__
from jaxcascade.commands.output import log


def add_models(commands) -> None:
    p = commands.add_parser("models", help="list the models that ship with jaxcascade: training data, licence, "
                            "accuracy measured on real scans",
                            description="List the models that ship inside jaxcascade (the names --model and "
                                        "--init-from take), each with what it was trained on, its licence and the "
                                        "accuracy measured on real scans.")
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    p.set_defaults(run=cmd_models)


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
        if "thick_slices" in card:
            print(f"  thick slices: {card['thick_slices']}")
        print(f"  licence: {card['licence']}")


def add_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="compare a segmentation with the truth",
                            description="Score a predicted lesion mask against the true one on the same grid: Dice, "
                                        "precision, recall, volume difference and lesion-wise detection.")
    p.add_argument("--pred", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_evaluate)


def cmd_evaluate(args, _overrides) -> None:
    from jaxcascade import api
    from jaxcascade.evaluation import metrics
    from jaxcascade.runtime import outputs

    values = api.evaluate(args.pred, args.truth)
    if args.json:
        print(json.dumps(outputs.json_safe(values), indent=2))
    else:
        print(metrics.format_metrics(values))


def add_build_kernels(commands) -> None:
    p = commands.add_parser("build-kernels", help="build the C++ CPU kernels now (e.g. on a cluster's login node), "
                            "retrying a failed build",
                            description="Build jaxcascade's C++ CPU kernels for this CPU now, retrying a build that "
                                        "failed before. With JAXCASCADE_KERNEL_DIR set, the build serves every node "
                                        "of the same CPU, including nodes without a compiler.")
    p.set_defaults(run=cmd_build_kernels)


def cmd_build_kernels(args, _overrides) -> None:
    from jaxcascade.ops import kernel_build

    built = kernel_build.build_kernels()
    log(f"built {built['library']}\n  with {built['compiler']}\n  command: {built['command']}")


def add_doctor(commands) -> None:
    p = commands.add_parser("doctor", help="what this machine gets: CPU class, whether the C++ kernels are built "
                            "and used here (and why not), JAX version and devices",
                            description="Print this CPU's class (AVX-512, AVX2, ARM, other) and the flags found, "
                                        "whether jaxcascade's C++ CPU kernels are built, loaded and used here and "
                                        "why not, and the JAX version and devices. Builds the kernels where they "
                                        "would be used, as a first run would.")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(run=cmd_doctor)


def cmd_doctor(args, _overrides) -> None:
    from jaxcascade.ops.kernel_report import describe, kernel_report

    report = kernel_report()
    print(json.dumps(report, indent=2) if args.json else f"jaxcascade {__version__}\n{describe(report)}")
