"""Held-out DSC against the number of training subjects (1, 2, 4, 8).

The last `test_subjects` subjects of the cohort are a fixed test set; each
repeat shuffles the remaining pool once and trains on its first n subjects
for every n, so training sets are nested. Writes
training_set_size.{csv,md,png}, training_set_size_folds.{csv,md} and
training_set_size_summary.json under results_dir.

Run (from the repository root; a rerun resumes, finished folds are skipped):
    python experiments/launch.py experiments/training_set_size.py
        tiny (4 mm) procedural phantom, 4 test subjects, 2 repeats, demo budget.
        Measured on a 2-core CPU, no GPU: 5 min 37 s; mean held-out DSC
        0.636 (1 subject), 0.755 (2), 0.785 (4), 0.935 (8).
    python experiments/launch.py experiments/training_set_size.py --config.smoke=true
        sizes (1, 2), 1 test subject, 1 epoch: 26 s; checks the plumbing only.
"""

import ml_collections

from jaxcascade.configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "training_set_size"
    config.results_dir = "experiments/results/training_set_size"
    config.train_subjects = (1, 2, 4, 8)
    config.test_subjects = 4
    config.repeats = 2  # training sets drawn twice (the 8-subject set is the whole pool: trained once)

    config.cohort = ml_collections.ConfigDict()
    config.cohort.kind = "procedural"  # or "mni" (needs pip install -e '.[nilearn]')
    config.cohort.size = "tiny"
    config.cohort.subjects = 12  # max(train_subjects) + test_subjects
    config.cohort.seed = 0
    # Your own data instead of a phantom: a folder in the training layout (<subject>/T1.nii.gz, FLAIR.nii.gz,
    # lesion.nii.gz) or a BIDS dataset with one labelled session per participant, e.g.
    # --config.cohort.data_dir=/data/study; kind, size and subjects are then unused.
    config.cohort.data_dir = ""

    config.cascade = demo.get_config()

    config.smoke = False
    config.smoke_overrides = (
        "--config.results_dir=experiments/results/training_set_size_smoke",
        "--config.cohort.size=tiny",
        "--config.cohort.subjects=3",
        "--config.train_subjects=(1, 2)",
        "--config.test_subjects=1",
        "--config.cascade.train.max_epochs=1",
    )
    return config
