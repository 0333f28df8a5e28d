"""A PyTorch baseline in a process of its own: `python -m benchmarks.baseline MODULE:FUNCTION 'JSON kwargs'`.

Started by `benchmarks.common.run_baseline` with jaxcascade's malloc settings in GLIBC_TUNABLES;
sets flush-to-zero and the threads (`common.configure_torch`), calls the function, and prints its
result (a JSON object) with the settings under 'baseline' as the last line.
"""

from __future__ import annotations

import importlib
import json
import sys

from benchmarks.common import configure_torch


def main(argv=None):
    target, kwargs = (argv or sys.argv[1:])[:2]
    _, settings = configure_torch()
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(kwargs))
    print(json.dumps({**result, "baseline": settings}))


if __name__ == "__main__":
    main()
