"""The one exception type for mistakes a user can make.

Library code raises `UserError` with a single line that names the file (or
option) and says what is wrong and what to do; only the CLI turns it into an
exit status and a line on stderr.
"""


class UserError(Exception):
    """A problem with the user's input, files or options (not a bug)."""
