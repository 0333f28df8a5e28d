"""The method's defaults, faithful to the seed code of Valverde et al. 2017.

Run:
    jaxcascade train --data DIR --workdir WD
    jaxcascade train --data DIR --workdir WD --config.train.max_epochs=50
Every number of the method lives here; a variant imports `get_config` and
overrides a few fields (see demo.py).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The convolutions' multiplications: "float32" (faithful, bitwise reproducible) or "bfloat16"
    # (sums, parameters and BatchNorm statistics stay float32; several times faster on GPUs, TPUs and
    # CPUs with AMX, at ~1e-2 probability differences). `segment --compute-dtype` overrides it.
    config.compute_dtype = "float32"
    config.data = _data()
    config.model = _model()
    # (x - mean(nonzero)) / std(nonzero) per image; "nicms" is nicMSlesions' variant; "percentile" and
    # "wm_peak" centre on the median or the white-matter peak and scale by a robust spread (normalisation.py).
    config.normalisation = "nonzero"
    # Bias-field correction of every image before its normalisation: "none" (the seed) or "n4"
    # (N4 through SimpleITK: pip install 'jaxcascade[n4]'; settings in bias_field.py).
    config.bias_correction = "none"
    config.candidates = ml_collections.ConfigDict()
    config.candidates.min_th = 0.5  # normalised FLAIR above this is a candidate
    config.sampling = ml_collections.ConfigDict()
    config.sampling.hard_negative_probability = 0.5  # CNN1 output above this on a non-lesion voxel
    config.sampling.hard_negative_fallback_flair = 2.0  # used where a volume has no such voxel
    config.train = _train()
    config.distributed = _distributed()
    config.inference = _inference()
    return config


def _data() -> ml_collections.ConfigDict:
    # One folder per subject holding <MODALITY><suffix> and <lesion><suffix>.
    data = ml_collections.ConfigDict()
    data.modalities = ("T1", "FLAIR")  # channel order of the network input
    data.flair = "FLAIR"  # the modality that selects candidates
    data.lesion = "lesion"
    # Partial annotation: where a subject folder also holds <labelled><suffix> (a 0/1 mask), only its
    # voxels were labelled, and both stages sample their training voxels there alone. A rater can then
    # outline the lesions of one hemisphere or a few slabs of a new scanner's subject and train on them.
    data.labelled = "labelled"
    data.suffix = ".nii.gz"
    # A BIDS dataset instead (it has dataset_description.json): each session with a derivatives
    # *_label-lesion_mask is a training subject; modalities map to suffixes T1w, FLAIR, T2w, PDw unless
    # overridden here, e.g. "T1=T1w,FLAIR=FLAIR".
    data.bids_suffixes = ""
    # Voxel orientation the networks see: images are permuted/flipped (exactly,
    # no resampling) into it, and outputs back to each file's own grid. "native"
    # uses the stored voxel order, as nicMSlesions did (imported models use it).
    data.orientation = "RAS"
    return data


def _model() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.network = "valverde2017_valid"  # or "valverde2017" (SAME padding, patch-wise only)
    model.patch_size = 11
    model.dropout_rate = 0.5
    model.bn_momentum = 0.9  # Lasagne batch_norm alpha=0.1
    model.bn_epsilon = 1e-4  # Lasagne batch_norm default
    model.conv_implementation = "auto"  # "lax" | "slices" | "auto" (per backend)
    return model


def _train() -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict()
    train.batch_size = 128
    train.validation_fraction = 0.25
    train.max_epochs = 200
    train.patience = 25
    train.learning_rate = 1.0  # Adadelta, as Lasagne's defaults
    train.rho = 0.95
    train.epsilon = 1e-6
    # "seed": half of each batch flipped along one of three flips of the last two axes;
    # "flips3d": independent flips of all three axes; "rot90": flips and axis permutations; "none".
    train.augmentation = "seed"
    train.intensity_augmentation = _intensity_augmentation()
    train.eval_batch_size = 1024
    # Fine-tuning: start from a model directory's weights (`train --init-from`), and train only
    # these top-level modules ("all", or e.g. "dense1,out"; nicMSlesions' one-shot: its last dense layers).
    train.init_from = ""
    train.trainable = "all"
    return train


def _intensity_augmentation() -> ml_collections.ConfigDict:
    # Random intensity transforms per sample and channel inside the train step, after the geometric
    # augmentation (intensity_augmentation.py). Off: the seed has none; configs/robust.py turns it on.
    # Each transform fires with its probability; ranges are (low, high), values in normalised (z) units.
    intensity = ml_collections.ConfigDict()
    intensity.enabled = False
    intensity.tail_probability = 0.5
    intensity.tail_knee = (0.3, 1.5)  # z units: above it, contrast to the rest x tail_slope
    intensity.tail_slope = (0.25, 1.2)  # log-uniform
    intensity.bias_field_probability = 0.3
    intensity.bias_field_max_log = 0.1  # a smooth field across the patch within [exp(-0.1), exp(0.1)]
    intensity.gamma_probability = 0.3
    intensity.gamma = (0.7, 1.5)  # on the patch rescaled to [0, 1]; log-uniform
    intensity.contrast_probability = 0.2
    intensity.contrast = (0.75, 1.25)  # about the patch mean
    intensity.brightness_probability = 0.2
    intensity.brightness_scale = (0.9, 1.1)
    intensity.brightness_shift = (-0.1, 0.1)
    intensity.noise_probability = 0.5
    intensity.noise_std = (0.0, 0.35)  # additive Gaussian noise (z units: 3x the phantom's default noise)
    return intensity


def _distributed() -> ml_collections.ConfigDict:
    # Multi-process runs (see README); empty/0/-1 means "from JAX_* environment variables, else one process".
    distributed = ml_collections.ConfigDict()
    distributed.coordinator_address = ""
    distributed.num_processes = 0
    distributed.process_id = -1
    distributed.auto = False  # let jax.distributed detect a cluster (SLURM, Open MPI, TPU)
    # Training subjects are dealt to this many data shards (0: one per process);
    # each process loads only its shards' subjects. Fix it to get the same
    # result on any number of hosts (see jaxcascade/training/batching.py).
    distributed.data_shards = 0
    return distributed


def _inference() -> ml_collections.ConfigDict:
    inference = ml_collections.ConfigDict()
    inference.stage2_min_probability = 0.8  # CNN2 runs where CNN1 > this
    inference.threshold = 0.8  # t_bin on CNN2's probability
    inference.min_lesion_voxels = 20  # l_min: keep components with more voxels than this
    inference.connectivity = 6
    inference.min_volume_ml = 0.0  # nicMSlesions' min_error; 0 disables
    inference.method = "auto"  # "dense" (exact, whole volume) where the network allows, else "patch"
    # Patches per call on the patch path, and dense blocks per call: small calls keep the convolutions'
    # GEMM buffers in cache (2-core Intel Xeon: 128 patches 1.56x faster than 2048; 8 blocks 1.1x than 16).
    inference.batch_size = 128
    inference.tile_size = 12  # dense path: output block edge; small blocks skip empty space (see README)
    inference.tiles_per_batch = 8
    # The same three on a GPU or TPU, where per-call overhead, not cache, sets the best size (NVIDIA
    # H200: 24^3 blocks x 16 per call 1.9x faster than 12^3 x 8; 4,096 patches per call 9.5x faster
    # than 128; benchmarks/gpu.py).
    inference.accelerator_batch_size = 4096
    inference.accelerator_tile_size = 24
    inference.accelerator_tiles_per_batch = 16
    # Test-time augmentation: both stages averaged over the 8 axis flips (8x the inference time).
    inference.tta = False
    # Settings for a FLAIR whose thickest voxel edge is from_mm or more (a 2D clinical FLAIR of 3-5 mm
    # slices) on a model trained on finer ones: interpolated onto the model's grid, the slices' blur moves
    # the probabilities (docs/real-scans.md, "Thick-slice FLAIR"). from_mm = 0: the model has none.
    inference.thick_slices = ml_collections.ConfigDict()
    inference.thick_slices.from_mm = 0.0
    inference.thick_slices.stage2_min_probability = 0.8
    inference.thick_slices.threshold = 0.8
    inference.thick_slices.min_lesion_voxels = 20
    return inference
