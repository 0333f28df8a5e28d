"""Fine-tuning from a model directory, optionally training only the last layers."""

import numpy as np

from jaxcascade.segmentation import cascade
from jaxcascade.storage import model_directory, weights
from jaxcascade import cli, config as config_lib
from conftest import QUICK_OVERRIDES
from test_errors import assert_user_error


def test_fine_tune_only_the_output_layer(trained_model, cohort, tmp_path):
    workdir = tmp_path / "tuned"
    assert cli.main(["train", "--init-from", str(trained_model), "--data", str(cohort / "train"),
                     "--workdir", str(workdir), "--config.train.max_epochs=1",
                     "--config.train.trainable=out"]) == 0
    config = config_lib.apply_overrides(config_lib.load_config("demo"), QUICK_OVERRIDES)
    for stage in (1, 2):
        template = cascade.Stage.load(trained_model, stage, config).variables
        before = weights.load(trained_model, stage, template)
        after = weights.load(workdir, stage, template)
        for frozen in ("conv1", "conv2", "dense1"):
            assert np.array_equal(before["params"][frozen]["kernel"], after["params"][frozen]["kernel"])
        for frozen in ("bn1", "bn2"):
            assert np.array_equal(before["batch_stats"][frozen]["mean"], after["batch_stats"][frozen]["mean"])
        assert not np.array_equal(before["params"]["out"]["kernel"], after["params"]["out"]["kernel"])
    stored = model_directory.read_model_config(workdir)
    assert stored.train.init_from == str(trained_model.resolve()) and stored.train.trainable == "out"


def test_fine_tuning_cannot_change_the_network_or_name_unknown_layers(trained_model, cohort, tmp_path, capsys):
    base = ["train", "--init-from", trained_model, "--data", cohort / "train", "--workdir", tmp_path / "wd"]
    assert_user_error(capsys, [*base, "--config.model.network=valverde2017"], "model.network", "cannot change")
    assert_user_error(capsys, [*base, "--config.train.trainable=fc9"], "no module fc9", "conv1")
    assert not (tmp_path / "wd").exists()
    assert_user_error(capsys, [*base, "--config", "demo"], "--init-from")
