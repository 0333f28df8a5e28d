"""What to do with a new scanner: train on scanner A, test on held-out subjects of A and of an unseen B.

Rows, on the same subjects: the faithful cascade (the demo budget of the seed's method); the `robust`
config (N4, 3D flips, intensity augmentation); each normalisation option and N4 alone; the faithful and
robust models fine-tuned on one labelled subject of scanner B (one-shot, as Valverde et al. 2019, but
every layer: see one_shot.trainable); nicMSlesions' pretrained baseline_2ch model (real MICCAI 2008 + 2016 scans,
imported from ../shared/interop/ when its files are there); and a floor: FLAIR above a threshold inside a
T1 white-matter mask, the threshold fitted on scanner A's training subjects. Scores: DSC, PPV, TPR,
lesion F1, and predicted against true total lesion volume (Pearson r, mean absolute difference in ml).
Writes new_scanner.{csv,md,png}, new_scanner_subjects.{csv,md} and new_scanner_summary.json under results_dir.

Run (from the repository root; a rerun reuses the cohorts, the trained models and the scores):
    python experiments/launch.py experiments/new_scanner.py
        MNI phantom at 2 mm (pip install -e '.[nilearn,n4,interop]'): scanner A `default`, B `low_contrast`;
        4 training subjects, 3 test subjects of A, 1 one-shot + 4 test subjects of B. Measured on a 2-core
        Intel Xeon: about 12 min, plus 58 min for nicMSlesions' scoring (1 mm, patch-wise). Mean DSC on
        A / B: faithful 0.935 / 0.155, robust 0.951 / 0.687, faithful+one-shot 0.885 / 0.703,
        robust+one-shot 0.763 / 0.795, nicMSlesions 0.817 / 0.000, FLAIR threshold 0.960 / 0.195
        (experiments/README.md, "A new scanner": the table, the figure, what it shows).
    python experiments/launch.py experiments/new_scanner.py --config.smoke=true
        tiny procedural phantom, 1 epoch, no nicMSlesions row: checks the plumbing (about 35 s in the tests).
"""

import ml_collections

from jaxcascade.configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "new_scanner"
    config.results_dir = "experiments/results/new_scanner"

    config.cohort = ml_collections.ConfigDict()
    config.cohort.kind = "mni"  # or "procedural"
    config.cohort.size = "small"
    # Scanner A's subjects; B's are drawn with seed + 1 (other brains). The robust config's settings were
    # developed on seed 0's cohort (A: seed 0, B: seed 1). The reported table uses seed 1: its scanner-B
    # brains (seed 2) are ones no choice saw; its scanner-A brains are the development run's B brains,
    # imaged now with scanner A.
    config.cohort.seed = 1
    config.cohort.scanner_a = "default"
    config.cohort.scanner_b = "low_contrast"
    config.cohort.train_subjects = 4
    config.cohort.test_subjects_a = 3
    config.cohort.one_shot_subjects = 1  # labelled subjects of B for fine-tuning
    config.cohort.test_subjects_b = 4

    # The faithful method at the demo budget; every variant is this budget on top of a packaged method.
    config.cascade = demo.get_config()
    # name -> "PACKAGED_CONFIG [--config.key=value ...]", trained from scratch on scanner A.
    config.variants = ml_collections.ConfigDict({
        "faithful": "default",
        "robust": "robust",
        "percentile": "default --config.normalisation=percentile",
        "wm_peak": "default --config.normalisation=wm_peak",
        "n4": "default --config.bias_correction=n4",
    })
    # One-shot adaptation: these variants fine-tuned on scanner B's labelled subject(s), only `trainable`.
    config.one_shot = ml_collections.ConfigDict()
    config.one_shot.variants = "faithful,robust"
    # Every layer: the dense layers alone (Valverde et al. 2019, nicMSlesions) measured far lower here.
    config.one_shot.trainable = "all"
    config.one_shot.max_epochs = 12
    config.one_shot.patience = 4

    # nicMSlesions' pretrained model (two HDF5 files; read, never copied); "" leaves the row out.
    config.nicms_dir = "../shared/interop/nicmslesions_baseline_2ch"
    config.nicms_modalities = "T1,FLAIR"

    config.smoke = False
    config.smoke_overrides = (
        "--config.results_dir=experiments/results/new_scanner_smoke",
        "--config.cohort.kind=procedural",
        "--config.cohort.size=tiny",
        "--config.cohort.train_subjects=2",
        "--config.cohort.test_subjects_a=1",
        "--config.cohort.test_subjects_b=2",
        "--config.cascade.train.max_epochs=1",
        "--config.one_shot.max_epochs=1",
        "--config.one_shot.variants=faithful",
        "--config.nicms_dir=",
    )
    return config
