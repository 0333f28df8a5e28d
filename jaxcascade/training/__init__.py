"""Training: which voxels each stage trains on (`sampling`), how rows become batches (`batching`), the
jitted steps (`train_steps`), the epoch loop with checkpoints and early stopping (`train_loop`), the
optimiser, intensity augmentation, the history, and `pipeline.train_cascade`, which chains them.

May import `jaxcascade.segmentation` and below (CNN2's hard negatives are mined with CNN1's inference).
"""
