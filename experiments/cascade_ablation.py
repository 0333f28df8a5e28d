"""CNN1 alone against the full cascade, on the leave-one-out folds.

Stage 1 alone is CNN1's probability thresholded at the same t_bin and
post-processed the same way (remove_small_lesions, min volume) as the
cascade's output. The claim checked: CNN2 removes most of CNN1's
false-positive lesions at equal or better DSC. Shares results_dir (cohort and
trained folds) with leave_one_out.py, so after that has run this costs only
the tables. Writes cascade_ablation.{csv,md,png} and cascade_ablation_summary.json.

Run (from the repository root):
    python experiments/launch.py experiments/cascade_ablation.py
        after leave_one_out.py: 2 s. Measured (2-core CPU): CNN1 alone made one
        false-positive lesion (on sub-01), which CNN2 removed; CNN2 removed 1602 of
        CNN1's 1699 false-positive voxels (94 %), mean DSC 0.797 -> 0.830, TPR 0.945 -> 0.722.
    python experiments/launch.py experiments/cascade_ablation.py --config.cohort.kind=mni \
        --config.results_dir=experiments/results/leave_one_out_mni
        MNI phantom: 0 false-positive lesions; FP voxels 1758 -> 33, DSC 0.827 -> 0.884.
    python experiments/launch.py experiments/cascade_ablation.py --config.smoke=true
        after the leave_one_out smoke run: 2 s.
"""

from experiments import leave_one_out


def get_config():
    config = leave_one_out.get_config()
    config.experiment = "cascade_ablation"
    return config
