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
        # One subject gives a few thousand lesion voxels: a short schedule, stopped on its validation loss
        # (10 epochs were not enough: the validation loss still fell at the tenth).
        "--config.train.max_epochs=20",
        "--config.train.patience=4",
        # Every layer adapts: the new scanner changes the first layers' inputs most.
        "--config.train.trainable=all",
        # Half of Adadelta's default step: the starting weights are good, one subject is easy to overfit.
        "--config.train.learning_rate=0.5",
        # Augmentation keeps the one subject from being learnt by heart.
        "--config.train.augmentation=flips3d",
        "--config.train.intensity_augmentation.enabled=true",
        # The seed's decision thresholds: a model adapted to the scanner is sure of its lesions again, and
        # the half-brain protocol (docs/real-scans.md) found CNN2 > 0.8 where CNN1 > 0.8, lesions of more
        # than 20 voxels, best on one fold and within 0.02 DSC of the best on the other; the `synth`
        # config's 0.5 over-segmented real brains (volume +48 % and +13 %).
        "--config.inference.stage2_min_probability=0.8",
        "--config.inference.threshold=0.8",
        "--config.inference.min_lesion_voxels=20",
    ]
