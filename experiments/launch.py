"""Run one experiment config.

    python experiments/launch.py experiments/leave_one_out.py [--config.key=value ...]
    python experiments/launch.py experiments/leave_one_out.py --config.smoke=true   # minutes on a CPU

The config's `experiment` field picks the runner (experiments/runners.py).
`--config.smoke=true` applies the config's own `smoke_overrides` (a tiny
cohort, one epoch, its own results folder), and overrides given on the
command line still win over them. Running the same command again resumes:
the cohort and every finished fold are reused, never regenerated or retrained.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the `experiments` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import runners  # noqa: E402
from jaxcascade import config as config_lib  # noqa: E402
from jaxcascade.errors import UserError  # noqa: E402

EXIT_USER_ERROR = 2


def load_experiment(path: str, overrides: list[str]):
    """The experiment config of `path` with command-line overrides (and its smoke overrides if asked)."""
    config = config_lib.apply_overrides(config_lib.load_config(path), overrides)
    for key in ("experiment", "results_dir", "cohort", "cascade", "smoke", "smoke_overrides"):
        if key not in config:
            raise UserError(f"{path}: not an experiment config (no {key!r} field); see experiments/README.md")
    if config.experiment not in runners.RUNNERS:
        raise UserError(f"{path}: experiment {config.experiment!r} is unknown; use one of {', '.join(runners.RUNNERS)}")
    if config.smoke:
        config = config_lib.apply_overrides(config, [*config.smoke_overrides, *overrides])
    return config


def run(config, log: Callable = print) -> dict:
    """Run (or resume) the experiment; returns its summary."""
    log(f"{config.experiment}: results folder {Path(config.results_dir).resolve()}")
    return runners.RUNNERS[config.experiment](config, log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0].startswith("-"):
            raise UserError("usage: python experiments/launch.py EXPERIMENT.py [--config.key=value ...]")
        run(load_experiment(argv[0], argv[1:]), log=lambda message: print(message, flush=True))
    except UserError as error:
        print(f"launch: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
