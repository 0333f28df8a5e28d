"""The demo's CPU budget: the default method with a short training schedule.

Run:
    jaxcascade demo                                  # phantom cohort, train, segment, evaluate
    jaxcascade train --data DIR --workdir WD --config jaxcascade/configs/demo.py
Expected: `jaxcascade demo` finishes in about 115 s on a 2-core CPU (85 s with a
warm compilation cache) with a held-out DSC of 0.93-0.95 depending on the CPU
model (measured: 0.933 on an Intel Xeon, 0.947 on an AMD EPYC; see the README).
"""

from jaxcascade.configs import default


def get_config():
    config = default.get_config()
    config.train.max_epochs = 12
    config.train.patience = 4
    return config
