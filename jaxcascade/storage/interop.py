"""Import nicMSlesions' pretrained Keras cascades (HDF5) as jaxcascade model directories.

nicMSlesions (github.com/sergivalverde/nicMSlesions) saved each stage's
weights with Keras 2 (TensorFlow backend, channels-first input). Its network is
`nicms.NicMS`, whose layer names are Keras' own, so a file maps one to one:
    conv*   kernel (3, 3, 3, in, out), bias     -> params kernel, bias (as is:
            TF convolutions are cross-correlations, like jaxcascade's)
    bn_*    gamma, beta                          -> params scale, bias
            moving_mean, moving_variance         -> batch_stats mean, var
    prelu_* alpha (C, D, H, W) or (features,)   -> params alpha, channels-last
    d*, out kernel (in, out), bias               -> params kernel, bias
Flatten order is handled by the network itself (see nicms.py). Weights are read
by each layer's `weight_names` attribute, because the inner HDF5 group names
carry Keras' per-session suffixes (`bn_1_1_1/gamma:0` in a second model).

The input channel order cannot be read from the files; the caller states it
(nicMSlesions' baseline_2ch is T1, FLAIR) and it is recorded as
config.data.modalities, which `segment` then enforces by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxcascade.storage import model_directory, weights
from jaxcascade import config as config_lib
from jaxcascade.networks import models
from jaxcascade.data import nifti
from jaxcascade.runtime import outputs
from jaxcascade.errors import UserError
from jaxcascade.networks.models import split_model

# Keras layer -> (NNX collection, NNX leaf) of each of its weights, in network order.
_CONV = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}
_BATCH_NORM = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
               "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}
_PRELU = {"alpha": ("params", "alpha")}
LAYER_WEIGHTS = {
    "conv1_1": _CONV, "bn_1_1": _BATCH_NORM, "prelu_conv1_1": _PRELU,
    "conv1_2": _CONV, "bn_1_2": _BATCH_NORM, "prelu_conv1_2": _PRELU,
    "conv2_1": _CONV, "bn_2_1": _BATCH_NORM, "prelu_conv2_1": _PRELU,
    "conv2_2": _CONV, "bn_2_2": _BATCH_NORM, "prelu_conv2_2": _PRELU,
    "d1": _CONV, "prelu_d1": _PRELU,
    "d2": _CONV, "prelu_d2": _PRELU,
    "d3": _CONV, "prelu_d3": _PRELU,
    "out": _CONV,
}
# Weightless layers Keras numbers per session (max_pooling3d_3, flatten_2, ...).
_WEIGHTLESS_LAYER = re.compile(r"in\d*|input_\d+|max_pooling3d_\d+|flatten_\d+|dr_d\d")

# nicMSlesions' baseline models were trained on 1 mm isotropic MICCAI 2008 / 2016 images.
NICMS_VOXEL_SIZE_MM = (1.0, 1.0, 1.0)

KNOWN_MODELS = {
    ("f4fb53f1a48c842b59ca0cda18c456aad9a0586740aa99bc07f8dc3a1e099528",
     "14250fae1121ed963882cab7fa7145b14dcfe35f2443d7cffe74f89e9054e13e"):
        "nicMSlesions baseline_2ch, GPL-3 (github.com/sergivalverde/nicMSlesions)",
}


@dataclasses.dataclass(frozen=True)
class KerasCascade:
    """Both stages' variables ({'params', 'batch_stats'} pure dicts, as models.split_model gives)."""

    stage1: dict
    stage2: dict
    in_channels: int
    patch_size: int


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserError("h5py is not installed: pip install 'jaxcascade[interop]'") from None
    return h5py


def read_keras_weights(path) -> dict:
    """{layer: {weight: array}} of a Keras 2 HDF5 file, weights named as Keras names them ('gamma', ...)."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Keras model file not found")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path}: not a readable HDF5 file ({error})") from None
    with file:
        # model.save() nests the weights under 'model_weights'; save_weights() does not.
        root = file["model_weights"] if "model_weights" in file else file
        if "layer_names" not in root.attrs:
            raise UserError(f"{path}: not a Keras 2 HDF5 model (no layer_names attribute)")
        layers = {}
        for layer in (_text(name) for name in root.attrs["layer_names"]):
            if layer not in root:
                raise UserError(f"{path}: layer {layer} is listed but has no group in the file")
            group, layer_weights = root[layer], {}
            for weight_name in (_text(name) for name in group.attrs.get("weight_names", [])):
                if weight_name not in group:
                    raise UserError(f"{path}: layer {layer} lists weight {weight_name} but holds no such dataset")
                # 'bn_1_1_1/moving_mean:0' -> 'moving_mean'
                layer_weights[weight_name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[weight_name], np.float32)
            layers[layer] = layer_weights
    return layers


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_layers(path, layers: dict) -> None:
    names = list(layers)
    missing = [name for name in LAYER_WEIGHTS if name not in layers]
    unexpected = [name for name in names
                  if name not in LAYER_WEIGHTS and (layers[name] or not _WEIGHTLESS_LAYER.fullmatch(name))]
    if missing or unexpected:
        problems = [f"missing layers {', '.join(missing)}" if missing else "",
                    f"unexpected layers {', '.join(unexpected)}" if unexpected else ""]
        raise UserError(f"{path}: not a nicMSlesions network: {'; '.join(p for p in problems if p)}")
    order = [name for name in names if name in LAYER_WEIGHTS]
    if order != list(LAYER_WEIGHTS):
        raise UserError(f"{path}: not a nicMSlesions network: layers in order {', '.join(order)}")
    for name, expected in LAYER_WEIGHTS.items():
        if set(layers[name]) != set(expected):
            raise UserError(f"{path}: layer {name} holds weights {', '.join(sorted(layers[name])) or 'none'}, "
                            f"expected {', '.join(expected)}")


def network_config():
    """jaxcascade's default config set to nicMSlesions' network and inference rules."""
    config = config_lib.load_config()
    config.model.network = "nicms"
    config.model.bn_epsilon = 1e-3  # Keras BatchNormalization defaults
    config.model.bn_momentum = 0.99
    config.normalisation = "nicms"
    config.inference.threshold = 0.5  # nicMSlesions' t_bin
    config.inference.min_lesion_voxels = 10  # l_min
    config.inference.min_volume_ml = 0.5  # min_error
    # This network runs patch-wise only, 0.12 GFLOP a patch. Small batches keep its
    # convolutions' GEMM buffers in cache: on a 2-core Intel Xeon 32-patch batches gave
    # 664 patches/s, 64: 633, 128: 550, 256 with lax.conv for its 11^3 layer: 418.
    config.inference.batch_size = 32
    return config


def keras_to_variables(path, layers: dict, template: dict) -> dict:
    """Map validated Keras weights onto an NNX variables template of the same network; shapes must match."""
    variables = {"params": {}, "batch_stats": {}}
    for layer, weights in LAYER_WEIGHTS.items():
        for keras_name, (collection, leaf) in weights.items():
            value = layers[layer][keras_name]
            if layer.startswith("prelu_conv"):
                value = np.moveaxis(value, 0, -1)  # Keras (C, D, H, W) -> channels-last
            expected = tuple(template[collection][layer][leaf].shape)
            if value.shape != expected:
                keras_shape = tuple(layers[layer][keras_name].shape)
                raise UserError(f"{path}: {layer}/{keras_name} has shape {keras_shape}, "
                                f"the network needs {expected} (channels-last)")
            if not np.isfinite(value).all():
                raise UserError(f"{path}: {layer}/{keras_name} holds NaN or Inf values")
            variables[collection].setdefault(layer, {})[leaf] = value
    if jax.tree.structure(variables) != jax.tree.structure(template):
        raise ValueError("LAYER_WEIGHTS does not cover every variable of the nicms network")
    return variables


def _read_stage(path) -> tuple[dict, int, int]:
    layers = read_keras_weights(path)
    _check_layers(path, layers)
    kernel, alpha = layers["conv1_1"]["kernel"], layers["prelu_conv1_1"]["alpha"]
    if kernel.ndim != 5 or alpha.ndim != 4:
        raise UserError(f"{path}: conv1_1/kernel {kernel.shape} and prelu_conv1_1/alpha {alpha.shape} "
                        "are not a 3D network's")
    in_channels, patch_size = kernel.shape[3], alpha.shape[-1]
    model_config = network_config().model
    model_config.patch_size = patch_size
    try:
        # Shapes only: initialising real weights would cost seconds of XLA compilation.
        _, template = split_model(nnx.eval_shape(lambda: models.build_network(model_config, in_channels, 0)))
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    return keras_to_variables(path, layers, template), in_channels, patch_size


def read_keras_cascade(model1_path, model2_path) -> KerasCascade:
    """Read and validate both stages of a nicMSlesions cascade."""
    stage1, channels1, patch1 = _read_stage(model1_path)
    stage2, channels2, patch2 = _read_stage(model2_path)
    if (channels1, patch1) != (channels2, patch2):
        raise UserError(f"{model2_path}: takes {channels2}-channel {patch2}^3 patches, "
                        f"but {model1_path} takes {channels1}-channel {patch1}^3 patches")
    return KerasCascade(stage1, stage2, channels1, patch1)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_modalities(modalities: tuple, flair: str) -> None:
    if not modalities or len(set(modalities)) != len(modalities):
        raise UserError(f"modalities={modalities!r}: give each input channel's name once, in order")
    if flair not in modalities:
        raise UserError(f"modalities={modalities!r}: lacks {flair} (candidate selection needs it)")


def _check_empty_output(out_dir: Path) -> None:
    outputs.check_output_path(out_dir, is_dir=True)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not an empty folder; choose a new out=...")


def import_keras(model1, model2, modalities: tuple, out) -> dict:
    """Write a jaxcascade model directory from nicMSlesions' model_1/model_2 HDF5 files.

    Args:
      model1, model2: the Keras files of CNN1 and CNN2.
      modalities: the networks' input channel names in order, e.g. ('T1', 'FLAIR').
      out: a new (or empty) folder; it is written beside itself and renamed
        into place, so a failure leaves nothing behind.

    Returns:
      The provenance record written to out/provenance.json.
    """
    out_dir, modalities = Path(out), tuple(modalities)
    config = network_config()
    _check_modalities(modalities, config.data.flair)
    _check_empty_output(out_dir)
    keras = read_keras_cascade(model1, model2)
    if keras.in_channels != len(modalities):
        raise UserError(f"{model1}: the network takes {keras.in_channels} input channels, "
                        f"modalities={modalities!r} names {len(modalities)}")
    config.data.modalities = modalities
    config.data.orientation = nifti.NATIVE  # nicMSlesions fed images in their stored voxel order
    config.model.patch_size = keras.patch_size
    hashes = (sha256(model1), sha256(model2))
    provenance = {
        "source": KNOWN_MODELS.get(hashes, "Keras models in nicMSlesions' architecture (not a known release)"),
        "files": [{"stage": stage, "path": str(Path(path).resolve()), "sha256": digest}
                  for stage, path, digest in ((1, model1, hashes[0]), (2, model2, hashes[1]))],
        "channel_order": list(modalities),
    }
    # mkdir (not mkdtemp, which makes it private to its owner) so the model gets the umask's permissions.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        model_directory.prepare_workdir(staging, config)  # config.json with the "jaxcascade" stamp
        outputs.write_json(provenance, staging / "provenance.json")
        model_directory.record_voxel_size(staging, NICMS_VOXEL_SIZE_MM)
        weights.save(staging, 1, keras.stage1)
        weights.save(staging, 2, keras.stage2)
        if out_dir.is_dir():
            out_dir.rmdir()  # checked empty above; rename cannot replace a folder otherwise
        os.rename(staging, out_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        raise
    return provenance
