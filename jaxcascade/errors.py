"""The exception types for what is not a bug: a user's mistake, a fault of the machine, an interrupted run.

Library code raises `UserError` with a single line that names the file (or
option) and says what is wrong and what to do; only the CLI turns it into an
exit status and a line on stderr.

A message (or warning) below the command line names a setting as the Python caller writes it:
`parameter=VALUE`, the parameter's name as the function takes it and VALUE a Python literal (a string
written with `!r`, True for a switch, a list or dict as the parameter takes it, `...` for "some value"):
`method='dense'`, `pass overwrite=True`, `bids_filters=['FLAIR:run=N']`, `choose another out_dir=...`.
The command line rewrites these forms into its flags (`--inference dense`, `--overwrite`, ...) through
its one table, `jaxcascade.commands.flags`; config overrides keep the `--config.KEY=VALUE` form that
both the API (`overrides=[...]`) and the command line take. `MachineFault` is the same for faults that
no input caused (a full disk, a read-only output folder, memory exhausted):
the work finished so far is kept and the same command continues it.
"""

import errno
import warnings


# Faults of the machine rather than of an input: no command can go on past them.
MACHINE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system"}


def out_of_memory(error: BaseException) -> str | None:
    """'out of memory' (and XLA's own first line) if `error` says memory ran out, else None.

    XLA reports an allocation it cannot make as a RuntimeError (jax.errors.JaxRuntimeError) whose message
    starts with its status code RESOURCE_EXHAUSTED, not as a MemoryError; matched by text so that this
    module imports no jax.
    """
    if isinstance(error, MemoryError):
        return "out of memory"
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, RuntimeError) and first.startswith("RESOURCE_EXHAUSTED"):
        return f"out of memory ({first[:200]})"
    return None


class UserError(Exception):
    """A problem with the user's input, files or options (not a bug)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint of the current step was saved."""

    def __init__(self, signum: int, stage: int, epoch: int, steps_done: int, steps: int):
        import signal

        self.signum = signum
        super().__init__(
            f"{signal.Signals(signum).name}: stopped in stage {stage}, epoch {epoch + 1} after step "
            f"{steps_done}/{steps}; checkpoint saved, rerun the same command to resume"
        )


class MachineFault(Exception):
    """The machine, not the input, failed (no space left, output folder read-only or gone, out of memory)."""


class JaxcascadeWarning(UserWarning):
    """Something the user should know that does not stop the work (the command line prints it as one line)."""


def warn(message: str) -> None:
    """Tell the user something in one line without stopping: a JaxcascadeWarning from the caller's caller."""
    warnings.warn(message, JaxcascadeWarning, stacklevel=3)
