"""The command line's commands: each module adds its subcommands' arguments (`add_*`) and runs them (`cmd_*`).

`jaxcascade/cli.py` builds the parser from them and turns errors into exit statuses. The commands import the
library lazily, inside the functions that run them, so that a command line that fails on its arguments
answers without importing JAX.
"""

EXIT_USER_ERROR = 2
# A study that ran to its end but could not segment some subjects (or compare some visit pairs): rows say why.
EXIT_SUBJECTS_FAILED = 1
# A fault of the machine (no space left, output folder read-only or gone, out of memory) stopped the work.
EXIT_MACHINE_FAULT = 3
