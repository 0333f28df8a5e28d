"""Training on domain-randomised phantoms for real scans: the `synth` phantom's cohorts, robust augmentation.

Run:
    jaxcascade phantom synth-data --kind synth --size full --subjects 8 --seed 11
    jaxcascade train --data synth-data --workdir synth-model --config synth
Expected: see docs/real-scans.md (patient26 of the Ljubljana database, no real label seen).

What changes from default.py, and why:
- train.augmentation = "flips3d" and intensity augmentation on (robust.py's): the phantom's contrasts
  are wide already, the augmentation widens them per patch.
- no bias correction: N4 needs SimpleITK, and a model that must run on a fresh install cannot
  require it; the phantom's bias fields (up to 30 %) and the augmentation's teach tolerance instead.
- the demo's budget (12 epochs at most, patience 4): the phantom supplies variety, not epochs.
- inference thresholds 0.5, as robust.py: a network that has not seen a scanner is less sure.
"""

from jaxcascade.configs import default


def get_config():
    config = default.get_config()
    config.train.max_epochs = 12
    config.train.patience = 4
    config.train.augmentation = "flips3d"
    config.train.intensity_augmentation.enabled = True
    config.inference.threshold = 0.5
    config.inference.stage2_min_probability = 0.5
    return config
