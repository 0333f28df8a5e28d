"""The accelerator paths, checked on a CPU machine: the train step and both inference kernels export for
CUDA and TPU (jax.export lowers without the hardware) with real convolutions, not the CPU kernel or GEMMs."""

import jax
import numpy as np
import pytest

from jaxcascade.ops import cpu_kernel
from jaxcascade.segmentation import dense, inference
from jaxcascade.networks import models
from jaxcascade.training import optimizer, train_steps
from jaxcascade.configs import default


@pytest.fixture(scope="module")
def network():
    config = default.get_config()
    graphdef, variables = models.split_model(models.build_network(config.model, 2, 0))
    return config, graphdef, variables


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


def _exported_ops(function, args, platforms) -> dict:
    # jaxcascade's CPU kernel is an FFI custom call, which jax.export refuses unless told.
    checks = [jax.export.DisabledSafetyCheck.custom_call(target) for target in cpu_kernel.TARGETS]
    text = jax.export.export(function, platforms=platforms, disabled_checks=checks)(*args).mlir_module()
    ops = {op: text.count(f"stablehlo.{op}") for op in ("convolution", "dot_general")}
    kernel_calls = sum(text.count(f"@{target}(") for target in cpu_kernel.TARGETS)
    return ops | {"cpu kernel": kernel_calls}


def _train_step_args(config, graphdef, variables):
    tx = optimizer.make_optimizer(optimizer.OptimizerSettings.from_config(config.train))
    state = train_steps.create_train_state(variables, tx)
    batch = {"patches": jax.ShapeDtypeStruct((128, 11, 11, 11, 2), np.float32),
             "labels": jax.ShapeDtypeStruct((128,), np.int32)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return train_steps.make_train_step(graphdef, config.train.augmentation), (_abstract(state), batch, key)


def test_train_step_exports_with_convolutions_for_accelerators_and_the_kernel_for_cpu(network):
    step, args = _train_step_args(*network)
    for platform in ("cuda", "tpu"):
        ops = _exported_ops(step, args, (platform,))
        # Forward, and the gradients for the input and the kernel, of both conv layers.
        assert ops["convolution"] >= 4, (platform, ops)
        assert ops["cpu kernel"] == 0, ops
    cpu = _exported_ops(step, args, ("cpu",))
    # On CPU, jaxcascade's kernel: both forwards, both kernel gradients, conv2's input gradient (conv1's input
    # is data, whose gradient XLA drops).
    assert cpu["convolution"] == 0 and cpu["cpu kernel"] == 5, cpu


def test_inference_kernels_export_for_cuda_and_tpu_in_one_module(network):
    _, graphdef, variables = network
    tiles = dense.make_tile_predictor(graphdef, 12, 9, 5)
    tile_args = (_abstract(variables), jax.ShapeDtypeStruct((60, 60, 60, 2), np.float32),
                 jax.ShapeDtypeStruct((60, 60, 60, 1), np.bool_), jax.ShapeDtypeStruct((16, 3), np.int32))
    patches = inference.make_centre_predictor(graphdef, 11)
    patch_args = (_abstract(variables), jax.ShapeDtypeStruct((60, 60, 60, 2), np.float32),
                  jax.ShapeDtypeStruct((256, 3), np.int32))
    assert cpu_kernel.available(), "the CPU kernel did not build here (a C++ compiler is needed)"
    # On CPU both 3^3 convolutions run in the C++ kernel (only where the mask's voxels read them); the
    # dense form's two pools and its head (dense1, ReLU, output layer; at the mask's voxels) too. Off CPU the
    # head is its two matrix products (kept_outputs.dense_head_where_p).
    for function, args, convolutions, kernel_calls in ((tiles, tile_args, 2, 5), (patches, patch_args, 2, 2)):
        ops = _exported_ops(function, args, ("cuda", "tpu"))
        assert ops["convolution"] >= 2 * convolutions and ops["dot_general"] >= 4, ops  # a branch per platform
        assert ops["cpu kernel"] == 0, ops
        cpu = _exported_ops(function, args, ("cpu",))
        assert cpu["convolution"] == 0 and cpu["cpu kernel"] == kernel_calls, cpu
