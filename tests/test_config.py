import pytest

from jaxcascade import config as config_lib
from jaxcascade.errors import UserError


def test_overrides_are_typed():
    config = config_lib.apply_overrides(config_lib.load_config(), [
        "--config.train.max_epochs=7", "--config.train.learning_rate=0.5", "--config.seed=3",
        "--config.data.modalities=T1,FLAIR,T2", "--config.model.network=valverde2017",
    ])
    assert config.train.max_epochs == 7 and isinstance(config.train.max_epochs, int)
    assert config.train.learning_rate == 0.5
    assert config.data.modalities == ("T1", "FLAIR", "T2")
    assert config.model.network == "valverde2017"


@pytest.mark.parametrize("override, message", [
    ("--config.train.max_epochs=1.5", "expected a value of type int"),
    ("--config.train", "expected --config.KEY=VALUE"),
    ("--config.train=3", "is a group of settings"),
    ("--config.trian.max_epochs=3", "unknown config key 'trian'"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        config_lib.apply_overrides(config_lib.load_config(), [override])


def test_packaged_and_user_config_files(tmp_path):
    demo = config_lib.load_config("demo")
    assert demo.train.max_epochs < config_lib.load_config().train.max_epochs
    user = tmp_path / "mine.py"
    user.write_text("from jaxcascade.configs import default\n\ndef get_config():\n"
                    "    c = default.get_config()\n    c.train.batch_size = 64\n    return c\n")
    assert config_lib.load_config(str(user)).train.batch_size == 64
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\n")
    with pytest.raises(UserError, match="no get_config"):
        config_lib.load_config(str(broken))
    with pytest.raises(UserError, match="not found"):
        config_lib.load_config(str(tmp_path / "absent.py"))


def test_json_round_trip_fills_new_defaults_and_rejects_unknown_keys():
    stored = config_lib.to_dict(config_lib.apply_overrides(config_lib.load_config(), ["--config.seed=9"]))
    del stored["inference"]["tile_size"]  # a setting added after this model was written
    restored = config_lib.from_dict(stored)
    assert restored.seed == 9 and restored.data.modalities == ("T1", "FLAIR")
    assert restored.inference.tile_size == config_lib.load_config().inference.tile_size
    stored["inference"]["warp_drive"] = 1
    with pytest.raises(UserError, match="unknown setting inference.warp_drive"):
        config_lib.from_dict(stored, "model/config.json")


def test_differences_lists_dotted_keys():
    a = config_lib.to_dict(config_lib.load_config())
    b = config_lib.to_dict(config_lib.apply_overrides(config_lib.load_config(), ["--config.train.patience=3"]))
    assert config_lib.differences(a, b) == ["train.patience"]


def test_a_model_saved_before_data_orientation_existed_keeps_the_stored_voxel_order(tmp_path):
    import json

    from jaxcascade.storage import model_directory

    record = {"jaxcascade": {"format_version": model_directory.FORMAT_VERSION, "version": "0.1.0"},
              **config_lib.to_dict(config_lib.load_config("default"))}
    del record["data"]["orientation"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert model_directory.read_model_config(tmp_path).data.orientation == "native"
    assert config_lib.load_config("default").data.orientation == "RAS"


def test_robust_config_changes_only_preprocessing_augmentation_and_thresholds():
    robust = config_lib.to_dict(config_lib.load_config("robust"))
    assert config_lib.differences(config_lib.to_dict(config_lib.load_config()), robust) == [
        "bias_correction", "inference.stage2_min_probability", "inference.threshold", "train.augmentation",
        "train.intensity_augmentation.enabled"]


def test_inference_call_sizes_follow_the_platform():
    import jax

    from jaxcascade.segmentation.inference import InferenceOptions

    stored = config_lib.to_dict(config_lib.load_config())
    del stored["inference"]["accelerator_tile_size"]  # a model saved before the accelerator settings
    config = config_lib.from_dict(stored)
    cpu, gpu = InferenceOptions.from_config(config, "cpu"), InferenceOptions.from_config(config, "gpu")
    assert (cpu.batch_size, cpu.tile_size, cpu.tiles_per_batch) == (config.inference.batch_size,
                                                                    config.inference.tile_size,
                                                                    config.inference.tiles_per_batch)
    assert (gpu.batch_size, gpu.tile_size, gpu.tiles_per_batch) == (config.inference.accelerator_batch_size,
                                                                    config.inference.accelerator_tile_size,
                                                                    config.inference.accelerator_tiles_per_batch)
    assert gpu.tile_size > cpu.tile_size and gpu.batch_size > cpu.batch_size
    here = InferenceOptions.from_config(config)  # JAX's own backend when none is named
    assert here == InferenceOptions.from_config(config, jax.default_backend())
    assert InferenceOptions.from_config(config, "tpu", tile_size=16).tile_size == 16  # explicit wins
