"""Run `jaxcascade segment ARGS` and note when the networks are first called (benchmarks/startup.py's probe).

Usage: python benchmarks/startup_probe.py STAMP_FILE SEGMENT_ARGS...
Writes time.time() at the first call of a stage's classifier (`segmentation.inference.classify`, or a function
`classifier` returns: stage 1 starting) to STAMP_FILE.
The hook is put on the module when the CLI itself imports it, so the CLI's own import order (and any
overlap it arranges) is what gets measured, not an order this probe would impose.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import time

TARGET = "jaxcascade.segmentation.inference"


class _StampFirstClassify(importlib.abc.MetaPathFinder):
    def __init__(self, stamp_file: str):
        self.stamp_file = stamp_file

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)

            def stamping(function):
                def stamped(*args, **kwargs):
                    if self.stamp_file:
                        with open(self.stamp_file, "w") as stamp:
                            stamp.write(repr(time.time()))
                        self.stamp_file = None
                    return function(*args, **kwargs)

                return stamped

            module.classify = stamping(module.classify)
            if hasattr(module, "classifier"):  # the method's classifier, chosen before either stage runs
                choose = module.classifier
                module.classifier = lambda *args, **kwargs: stamping(choose(*args, **kwargs))

        spec.loader.exec_module = exec_module
        return spec


def main() -> int:
    stamp_file, *arguments = sys.argv[1:]
    sys.meta_path.insert(0, _StampFirstClassify(stamp_file))
    from jaxcascade.cli import main as cli_main
    return cli_main(["segment", *arguments])


if __name__ == "__main__":
    sys.exit(main())
