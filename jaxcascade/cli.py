"""`jaxcascade` command line: parse arguments, call library functions, report.

User mistakes (`UserError`) become one line on stderr and exit status 2; faults of the machine
(`MachineFault`, a full disk or quota, memory exhausted: MemoryError or XLA's RESOURCE_EXHAUSTED) one
line and status 3; a study in which some subjects failed exits with 1. A reader that closes the pipe
early (`| head`) ends the command quietly; nothing else is caught, so a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from jaxcascade.commands import (EXIT_MACHINE_FAULT, EXIT_SUBJECTS_FAILED, EXIT_USER_ERROR,  # noqa: F401
                                 change, cohort, info, segmenting, training)
from jaxcascade.commands.arguments import hint_input_pairs
from jaxcascade.commands.flags import to_flags
from jaxcascade.commands.output import configure_output
from jaxcascade.errors import MACHINE_ERRNOS, MachineFault, TrainingInterrupted, UserError, out_of_memory
from jaxcascade.version import __version__



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

    for add in (cohort.add_phantom, training.add_train, segmenting.add_segment, change.add_change, info.add_models,
                info.add_evaluate, training.add_import_keras, info.add_build_kernels, info.add_doctor, cohort.add_demo):
        add(commands)
    return parser


# Commands that start JAX: under a small address-space limit they would die in C++ rather than fail in Python.
_COMPUTING_COMMANDS = ("train", "segment", "demo", "import-keras", "change")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        configure_output(args.verbosity)
        if unknown and not getattr(args, "overrides", False):
            hint_input_pairs(getattr(args, "input", None), unknown)
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
        print(f"jaxcascade: error: {to_flags(str(error))}", file=sys.stderr)  # the library names parameters
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
