"""Leave-one-out evaluation of the cascade on a phantom cohort (the paper's protocol).

Every subject is held out once: a cascade is trained on the others and
segments it. Writes leave_one_out.{csv,md,png} and leave_one_out_summary.json
under results_dir (each fold under folds/<subject>/).

Run (from the repository root; a rerun resumes, finished folds are skipped):
    python experiments/launch.py experiments/leave_one_out.py
        4 procedural 2 mm subjects, demo budget (<= 12 epochs a stage). Measured on
        a 2-core CPU, no GPU: 8 min 39 s; mean held-out DSC 0.830, PPV 0.986,
        TPR 0.722, lesion F1 0.782 (experiments/README.md has the table).
    python experiments/launch.py experiments/leave_one_out.py --config.cascade.model.network=valverde2017 \
        --config.results_dir=experiments/results/leave_one_out_same
        the same folds with the seed's SAME network (patch-wise inference): 23 min 12 s;
        mean DSC 0.842, PPV 0.967, TPR 0.748, lesion F1 0.782.
    python experiments/launch.py experiments/leave_one_out.py --config.cohort.kind=mni \
        --config.results_dir=experiments/results/leave_one_out_mni
        the MNI152 phantom (pip install -e '.[nilearn]'): 5 min 55 s; mean DSC 0.884.
    python experiments/launch.py experiments/leave_one_out.py --config.cohort.data_dir=/data/bids_study \
        --config.folds=5 --config.results_dir=experiments/results/my_study
        5-fold cross-validation on your own BIDS dataset (or a training-layout folder).
    python experiments/launch.py experiments/leave_one_out.py --config.smoke=true
        tiny phantom, 3 subjects, 1 epoch: 37 s; checks the plumbing, the scores mean nothing.
The paper's budget is --config.cascade.train.max_epochs=200 --config.cascade.train.patience=25
(with --config.results_dir=... of its own); not run here.
"""

import ml_collections

from jaxcascade.configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "leave_one_out"
    config.results_dir = "experiments/results/leave_one_out"

    # The cohort the launcher writes into results_dir/cohort (phantom.py or phantom_mni.py).
    config.cohort = ml_collections.ConfigDict()
    config.cohort.kind = "procedural"  # or "mni" (needs pip install -e '.[nilearn]')
    config.cohort.size = "small"  # tiny 4 mm, small 2 mm, full 1 mm
    config.cohort.subjects = 4  # 4 folds of 3 training subjects: about 12 minutes on 2 CPU cores
    config.cohort.seed = 0
    # Your own data instead of a phantom: a folder in the training layout (<subject>/T1.nii.gz, FLAIR.nii.gz,
    # lesion.nii.gz) or a BIDS dataset (sessions with a derivatives *_label-lesion_mask; see README),
    # e.g. --config.cohort.data_dir=/data/study; kind, size and subjects are then unused.
    config.cohort.data_dir = ""
    # 0: leave-one-out; K: K-fold, participants shuffled by cohort.seed. Folds are by participant: all
    # sessions of a person are held out together.
    config.folds = 0

    # The method's config, trained once per fold; --config.cascade.train.max_epochs=200 etc.
    config.cascade = demo.get_config()

    config.smoke = False  # --config.smoke=true applies smoke_overrides: a CPU check in about a minute
    config.smoke_overrides = (
        "--config.results_dir=experiments/results/leave_one_out_smoke",
        "--config.cohort.size=tiny",
        "--config.cohort.subjects=3",
        "--config.cascade.train.max_epochs=1",
    )
    return config
