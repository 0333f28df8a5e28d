"""Adapting a trained model to a new scanner from ONE labelled subject: a fine-tuning recipe.

Run:
    jaxcascade train --init-from default --config oneshot --data ONE_SUBJECT --workdir tuned
    jaxcascade segment --model tuned --input T1=t1.nii.gz --input FLAIR=flair.nii.gz --out seg.nii.gz
The subject folder holds T1, FLAIR and lesion (.nii.gz); a `labelled.nii.gz` beside them limits
training to the region a rater outlined (config.data.labelled). Measured on real scans with the
half-brain protocol in docs/real-scans.md.

A recipe is a list of overrides of the starting model's own config (the network, channels and
normalisation stay the model's): see fine_tuning_overrides() for each setting and why.
"""


def fine_tuning_overrides() -> list[str]:
    return [
        # One subject gives a few thousand lesion voxels: a short schedule, stopped on its validation loss.
        "--config.train.max_epochs=10",
        "--config.train.patience=3",
        # Every layer adapts: the new scanner changes the first layers' inputs most.
        "--config.train.trainable=all",
        # Half of Adadelta's default step: the starting weights are good, one subject is easy to overfit.
        "--config.train.learning_rate=0.5",
        # Augmentation keeps the one subject from being learnt by heart.
        "--config.train.augmentation=flips3d",
        "--config.train.intensity_augmentation.enabled=true",
    ]
