"""nicMSlesions' Keras cascade imported into jaxcascade: weights, parity, realism, CLI.

The HDF5 files are nicMSlesions' GPL-3 baseline_2ch models; they live in
../shared beside the repository and are never copied into it. Tests that need
them are skipped (with the reason) where that folder is absent.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.special
from flax import nnx

from jaxcascade.segmentation import cascade, inference
from jaxcascade.storage import interop, model_directory, weights
from jaxcascade import cli, phantom
from jaxcascade.networks import layers, models
from jaxcascade.data.normalisation import candidate_mask, normalise_channels
from jaxcascade.errors import UserError

h5py = pytest.importorskip("h5py", reason="the Keras reference reads HDF5: pip install 'jaxcascade[interop]'")

KERAS_DIR = Path(__file__).resolve().parents[2] / "shared" / "interop" / "nicmslesions_baseline_2ch"
PATCH = 11


@pytest.fixture(scope="module")
def keras_files():
    if not KERAS_DIR.is_dir():
        pytest.skip(f"nicMSlesions' Keras models not found at {KERAS_DIR}")
    return KERAS_DIR / "model_1.hdf5", KERAS_DIR / "model_2.hdf5"


@pytest.fixture(scope="module")
def model_dir(keras_files, tmp_path_factory):
    """One imported model for the whole module (through the real CLI): XLA compiles once."""
    out = tmp_path_factory.mktemp("imported") / "nicms"
    status = cli.main(["import-keras", "--model1", str(keras_files[0]), "--model2", str(keras_files[1]),
                       "--modalities", "T1,FLAIR", "--out", str(out)])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def imported(model_dir):
    return cascade.Cascade.load(model_dir)


@pytest.fixture(scope="module")
def subject():
    """A 2 mm phantom, normalised as nicMSlesions does, channels (T1, FLAIR)."""
    data = phantom.make_subject(phantom.subject_seed(0, 0), "small")
    volume = normalise_channels([data["T1"], data["FLAIR"]], "nicms")
    return volume, data["lesion"].astype(bool)


# ----------------------------------------------------------------------------- the network itself


def _nicms_config():
    config = interop.network_config().model
    assert config.network == "nicms"
    return config


def test_nicms_network_shapes_and_keras_initial_slopes():
    # Shapes only (eval_shape): compiling a real initialisation costs seconds on CPU.
    model = nnx.eval_shape(lambda: models.build_network(_nicms_config(), 2, 0))
    assert nnx.eval_shape(lambda m: m(jnp.ones((3, PATCH, PATCH, PATCH, 2))), model).shape == (3, 2)
    assert model.prelu_conv1_1.alpha.shape == (11, 11, 11, 32)  # channels-last, per element
    assert model.prelu_conv2_2.alpha.shape == (5, 5, 5, 64)
    assert not np.any(layers.PReLU((4,)).alpha[...])  # Keras' PReLU starts at alpha = 0
    # 4 convs + 4 BN (scale, bias) + 4 conv PReLUs + 4 dense + 3 dense PReLUs.
    convs = (27 * 2 * 32 + 32) + (27 * 32 * 32 + 32) + (27 * 32 * 64 + 64) + (27 * 64 * 64 + 64)
    batch_norm = 2 * (32 + 32 + 64 + 64)
    conv_slopes = 2 * 11**3 * 32 + 2 * 5**3 * 64
    dense = (512 * 256 + 256) + (256 * 128 + 128) + (128 * 64 + 64) + (64 * 2 + 2) + 256 + 128 + 64
    assert models.count_parameters(model) == convs + batch_norm + conv_slopes + dense
    assert model.dense_halo is None  # per-position slopes: patch-wise only


# ----------------------------------------------------------------------------- an independent Keras forward pass


def _keras_layers(path) -> dict:
    """{layer: {weight: float64 array}} straight from the HDF5 file, by each layer's weight_names."""
    layers = {}
    with h5py.File(path, "r") as file:
        for layer in file.attrs["layer_names"]:
            group = file[layer]
            layers[layer.decode()] = {
                name.decode().rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[name], np.float64)
                for name in group.attrs["weight_names"]
            }
    return layers


def _keras_forward(layers: dict, patches_channels_first: np.ndarray) -> np.ndarray:
    """Logits of nicMSlesions' Keras model (before its softmax), computed as Keras/TF does (channels-first)."""
    x = patches_channels_first.astype(np.float64)

    def conv_same(x, weights):  # TF cross-correlation with zero SAME padding
        kernel, (depth, height, width) = weights["kernel"], x.shape[2:]
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))
        out = sum(np.einsum("ncdhw,co->nodhw", padded[:, :, a:a + depth, b:b + height, c:c + width], kernel[a, b, c])
                  for a in range(3) for b in range(3) for c in range(3))
        return out + weights["bias"][None, :, None, None, None]

    def batch_norm(x, w):  # inference mode, Keras' epsilon
        shape = (1, -1, 1, 1, 1)
        scale = w["gamma"] / np.sqrt(w["moving_variance"] + 1e-3)
        return (x - w["moving_mean"].reshape(shape)) * scale.reshape(shape) + w["beta"].reshape(shape)

    def prelu(x, w):
        return np.maximum(x, 0) + w["alpha"] * np.minimum(x, 0)

    def max_pool(x):  # pool 2, stride 2, 'valid': the odd last plane is dropped
        n, c, d, h, w = x.shape
        x = x[:, :, : d // 2 * 2, : h // 2 * 2, : w // 2 * 2]
        return x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2).max(axis=(3, 5, 7))

    for block in ("1", "2"):
        for layer in ("1", "2"):
            x = conv_same(x, layers[f"conv{block}_{layer}"])
            x = prelu(batch_norm(x, layers[f"bn_{block}_{layer}"]), layers[f"prelu_conv{block}_{layer}"])
        x = max_pool(x)
    x = x.reshape(len(x), -1)  # Keras Flatten: C order of (C, D, H, W)
    for dense in ("d1", "d2", "d3"):
        x = prelu(x @ layers[dense]["kernel"] + layers[dense]["bias"], layers[f"prelu_{dense}"])
    return x @ layers["out"]["kernel"] + layers["out"]["bias"]  # Keras then applies softmax


def _parity_patches(volume, lesion) -> np.ndarray:
    """Channels-last patches: real ones at lesion and non-lesion candidates, plus unit-normal noise."""
    rng = np.random.default_rng(0)
    candidates = candidate_mask(volume[..., 1], 0.5)
    centres = np.concatenate([
        np.argwhere(candidates & lesion)[rng.choice((candidates & lesion).sum(), 3, replace=False)],
        np.argwhere(candidates & ~lesion)[rng.choice((candidates & ~lesion).sum(), 3, replace=False)],
    ])
    half = PATCH // 2
    padded = np.pad(volume, ((half, half),) * 3 + ((0, 0),))
    real = np.stack([padded[z:z + PATCH, y:y + PATCH, x:x + PATCH] for z, y, x in centres])
    noise = rng.standard_normal((2, PATCH, PATCH, PATCH, 2)).astype(np.float32)
    return np.concatenate([real, noise]).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)  # compiled once: both stages share a graph
def _logits(graphdef, variables, patches):
    return nnx.merge(graphdef, variables["params"], variables["batch_stats"])(patches)


def _lesion_log_odds(logits: np.ndarray) -> np.ndarray:
    return logits[:, 1] - logits[:, 0]


def test_imported_networks_match_an_independent_keras_forward_pass(keras_files, imported, subject):
    patches = _parity_patches(*subject)
    for path, stage in zip(keras_files, (imported.stage1, imported.stage2)):
        expected = _lesion_log_odds(_keras_forward(_keras_layers(path), np.moveaxis(patches, -1, 1)))
        got = _lesion_log_odds(np.asarray(_logits(stage.graphdef, stage.variables, patches), np.float64))
        probability_difference = np.abs(scipy.special.expit(got) - scipy.special.expit(expected)).max()
        log_odds_difference = (np.abs(got - expected) / np.maximum(1, np.abs(expected))).max()
        print(f"{path.name}: max |probability difference| {probability_difference:.1e}, "
              f"max relative log-odds difference {log_odds_difference:.1e}")
        assert probability_difference <= 1e-5, (path.name, probability_difference)
        # Probabilities saturate; the log-odds show any error (float32 sums: ~1e-6 relative).
        assert log_odds_difference <= 1e-4, (path.name, log_odds_difference)
        # Not vacuous: the patches get both answers.
        assert expected.min() < -2 and expected.max() > 2


# ----------------------------------------------------------------------------- realism on the phantom


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC from ranks (ties share their mean rank)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, tie_group, tie_count = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie_group, weights=ranks) / tie_count)[tie_group]
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def test_roc_auc_rank_formula():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5


def test_stage1_separates_lesions_only_in_t1_flair_order(imported, subject):
    """The real-data weights must find phantom lesions, and only with the channels in their order."""
    volume, lesion = subject
    rng = np.random.default_rng(1)
    candidates = candidate_mask(volume[..., 1], 0.5)
    # A random subset keeps the test fast: 0.12 GFLOP per patch on a CPU.
    subset = np.zeros_like(candidates)
    for pool, count in ((candidates & lesion, 150), (candidates & ~lesion, 350)):
        centres = np.argwhere(pool)
        subset[tuple(centres[rng.choice(len(centres), count, replace=False)].T)] = True
    options = inference.InferenceOptions.from_config(imported.config, method="patch")
    auc = {}
    for name, channels in (("T1,FLAIR", [0, 1]), ("FLAIR,T1", [1, 0])):
        probability = inference.classify(imported.stage1, volume[..., channels], subset, options)
        auc[name] = roc_auc(probability[subset], lesion[subset])
    print(f"stage-1 ROC AUC on 2 mm phantom candidates: {auc}")
    assert auc["T1,FLAIR"] > 0.9, auc
    assert auc["FLAIR,T1"] < auc["T1,FLAIR"] - 0.3, auc


# ----------------------------------------------------------------------------- the model directory and the CLI


def test_import_writes_a_stamped_model_directory_with_provenance(model_dir, keras_files):
    config = model_directory.read_model_config(model_dir)  # checks the "jaxcascade" stamp
    assert config.model.network == "nicms" and config.model.bn_epsilon == 1e-3
    assert config.data.modalities == ("T1", "FLAIR") and config.normalisation == "nicms"
    assert config.data.orientation == "native"  # nicMSlesions read images in their stored voxel order
    assert (config.inference.threshold, config.inference.min_lesion_voxels, config.inference.min_volume_ml) == (
        0.5, 10, 0.5)
    assert weights.stage_done(model_dir, 1) and weights.stage_done(model_dir, 2)
    provenance = json.loads((model_dir / "provenance.json").read_text())
    assert "baseline_2ch" in provenance["source"] and "GPL-3" in provenance["source"]
    assert [f["sha256"] for f in provenance["files"]] == [interop.sha256(p) for p in keras_files]
    assert provenance["channel_order"] == ["T1", "FLAIR"]


def test_segment_runs_unchanged_on_the_imported_model(model_dir, tmp_path, capsys):
    phantom.write_cohort(tmp_path / "cohort", 1, seed=0, size="tiny")
    folder = tmp_path / "cohort" / "sub-01"
    out = tmp_path / "seg.nii.gz"
    # The model records nicMSlesions' 1 mm; at 4 mm it would resample 64-fold, so keep the input's grid here.
    status = cli.main(["segment", "--model", str(model_dir), "--input", f"T1={folder / 'T1.nii.gz'}",
                       "--input", f"FLAIR={folder / 'FLAIR.nii.gz'}", "--out", str(out), "--resample", "never"])
    assert status == 0
    assert "voxel size 4x4x4 mm, the model was trained at 1x1x1 mm" in capsys.readouterr().err
    mask, flair = nib.load(out), nib.load(folder / "FLAIR.nii.gz")
    assert np.array_equal(mask.affine, flair.affine) and mask.shape == flair.shape
    truth = np.asarray(nib.load(folder / "lesion.nii.gz").dataobj) > 0
    found = np.asarray(mask.dataobj) > 0
    # Even on a 4 mm grid the imported cascade finds most lesion voxels (measured DSC ~0.8).
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.5


def _import(tmp_path, model1, model2, modalities="T1,FLAIR", out=None):
    out = out or tmp_path / "out"
    return cli.main(["import-keras", "--model1", str(model1), "--model2", str(model2),
                     "--modalities", modalities, "--out", str(out)])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxcascade: error: "), err
    return err


def _edited_copy(source, target, edit):
    """A copy of a Keras file (in tmp_path only) with one change made by edit(h5py.File)."""
    with h5py.File(source, "r") as original, h5py.File(target, "w") as copy:
        for key, value in original.attrs.items():
            copy.attrs[key] = value
        for name in original:
            original.copy(name, copy)
        edit(copy)
    return target


def test_import_refuses_missing_files_and_wrong_modalities(keras_files, tmp_path, capsys):
    assert _import(tmp_path, tmp_path / "absent.hdf5", keras_files[1]) == 2
    assert "absent.hdf5: Keras model file not found" in _error_line(capsys)
    assert _import(tmp_path, keras_files[0], keras_files[1], modalities="FLAIR") == 2
    assert "takes 2 input channels, --modalities FLAIR names 1" in _error_line(capsys)
    assert _import(tmp_path, keras_files[0], keras_files[1], modalities="T1,PD") == 2
    assert "lacks FLAIR" in _error_line(capsys)
    (tmp_path / "not_h5.hdf5").write_text("hello")
    assert _import(tmp_path, tmp_path / "not_h5.hdf5", keras_files[1]) == 2
    assert "not a readable HDF5 file" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_non_empty_output(keras_files, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _import(tmp_path, *keras_files, out=out) == 2
    assert "already exists and is not an empty folder" in _error_line(capsys)
    assert os.listdir(out) == ["keep.txt"]


def test_import_refuses_models_of_another_architecture(keras_files, tmp_path, capsys):
    def single_channel(file):
        kernel = file["conv1_1/conv1_1/kernel:0"]
        value = kernel[...][:, :, :, :1]
        del file["conv1_1/conv1_1/kernel:0"]
        file["conv1_1"].create_dataset("conv1_1/kernel:0", data=value)

    def without_d3(file):
        file.attrs["layer_names"] = [n for n in file.attrs["layer_names"] if n != b"d3"]

    def narrower_d2(file):
        value = file["d2/d2/bias:0"][...][:100]
        del file["d2/d2/bias:0"]
        file["d2"].create_dataset("d2/bias:0", data=value)

    one = _edited_copy(keras_files[0], tmp_path / "one.hdf5", single_channel)
    assert _import(tmp_path, one, keras_files[1]) == 2
    assert "one.hdf5 takes 1-channel" in _error_line(capsys)  # the two stages must agree
    assert _import(tmp_path, one, one, modalities="T1,FLAIR") == 2
    assert "one.hdf5: the network takes 1 input channels, --modalities T1,FLAIR names 2" in _error_line(capsys)
    assert _import(tmp_path, _edited_copy(keras_files[0], tmp_path / "no_d3.hdf5", without_d3), keras_files[1]) == 2
    assert "no_d3.hdf5: not a nicMSlesions network: missing layers d3" in _error_line(capsys)
    narrow = _edited_copy(keras_files[0], tmp_path / "narrow.hdf5", narrower_d2)
    assert _import(tmp_path, narrow, keras_files[1]) == 2
    assert "narrow.hdf5: d2/bias has shape (100,), the network needs (128,)" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_nothing_behind(keras_files, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        interop.import_keras(*keras_files, ("T1", "FLAIR"), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_missing_h5py_is_a_one_line_user_error(keras_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(UserError, match=r"h5py is not installed: pip install 'jaxcascade\[interop\]'"):
        interop.read_keras_weights(keras_files[0])
