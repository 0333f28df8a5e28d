"""What the command line prints: the library's log on stdout, its warnings as one line on stderr, progress bars.

The library names settings as parameters (`overwrite=True`); what is printed here names the flags
(`--overwrite`), as `cli.main` does for errors (`flags.to_flags`)."""

from __future__ import annotations

import logging
import sys
import warnings

from jaxcascade.commands.flags import to_flags
from jaxcascade.errors import JaxcascadeWarning

LOGGER = logging.getLogger("jaxcascade")
QUIET = {"on": False}


def progress(iterable, description=""):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, disable=True if QUIET["on"] else None, file=sys.stderr)


def log(message: str) -> None:
    LOGGER.info(message)


def warn(message: str) -> None:
    warnings.warn(message, JaxcascadeWarning, stacklevel=2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """jaxcascade's warnings as one line, `jaxcascade: warning: ...`; others as Python shows them."""
    if issubclass(category, JaxcascadeWarning):
        print(f"jaxcascade: warning: {to_flags(str(message))}", file=sys.stderr, flush=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class _FlagsFormatter(logging.Formatter):
    """The library's log lines name parameters (`bids_filters=[...]`); the command line shows its flags."""

    def format(self, record: logging.LogRecord) -> str:
        return to_flags(super().format(record))


def configure_output(verbosity: int) -> None:
    """The library logs to the `jaxcascade` logger and warns with JaxcascadeWarning; the command line prints
    the log on stdout (-q: warnings and errors only; -v: debug too) and each warning as one line on stderr."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_FlagsFormatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    LOGGER.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    QUIET["on"] = verbosity < 0
    # nibabel logs its own lines about a file it rejects; the command line already says it once, naming the file.
    for name in ("nibabel", "nibabel.global"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.simplefilter("always", JaxcascadeWarning)  # a warning about each file, each time
    warnings.showwarning = _show_warning


def note_without_kernels() -> None:
    """One line on stderr when a long job computes on the CPU without the C++ kernels (-q silences it)."""
    from jaxcascade.ops.kernel_report import without_kernels_note

    note = without_kernels_note()
    if note and not QUIET["on"]:
        print(f"jaxcascade: note: {note}", file=sys.stderr, flush=True)
