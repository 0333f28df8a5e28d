"""The one exception type for mistakes a user can make.

Library code raises `UserError` with a single line that names the file (or
option) and says what is wrong and what to do; only the CLI turns it into an
exit status and a line on stderr.
"""


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
