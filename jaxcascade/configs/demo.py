"""The demo's CPU budget: the default method with a short training schedule.

Run:
    jaxcascade demo                                  # phantom cohort, train, segment, evaluate
    jaxcascade train --data DIR --workdir WD --config jaxcascade/configs/demo.py
Expected: `jaxcascade demo` finishes in under a minute on a 2-core CPU with a warm
compilation cache, with a held-out DSC between about 0.82 and 0.95: twelve epochs on a
tiny cohort amplify last-bit differences between CPU models (measured with the C++
kernels: 0.894 on an Intel Xeon at commit 1c09916, 49 s; 0.825 on an AMD EPYC at commit
305c065, 25 s; see docs/method.md).
"""

from jaxcascade.configs import default


def get_config():
    config = default.get_config()
    config.train.max_epochs = 12
    config.train.patience = 4
    return config
