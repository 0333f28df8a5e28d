"""The networks: the paper's patch classifier (Flax NNX), the registry that names every network, and
`split_model` (module -> graph definition + pure-dict variables).

Shared layers live in `layers.py`; nicMSlesions' network in `nicms.py`. To add
a network, write its module (with a `dense_halo` property: the receptive
field - 1 where it has an exact dense form, else None) and register it in
NETWORKS; the tests then check its parameter count, its patch -> logits
contract and, where it claims one, its dense form against patch-wise outputs.

'valverde2017' is the paper's network as the seed code built it (Lasagne,
SAME padding):
    conv 3^3 32 + BN + ReLU, maxpool 2, conv 3^3 64 + BN + ReLU, maxpool 2,
    dropout 0.5, dense 256 + ReLU, dense 2 + softmax.
'valverde2017_valid' (the default) is the same stack with VALID convolutions:
11 -> 9 -> pool 4 -> 2 -> pool 1. Its output at a voxel never sees zero
padding inside the patch and has no per-position parameters, so it can be
evaluated densely over a whole volume with exactly the patch-wise result.
Its receptive field is 10 voxels (offsets -5..+4): the pooling floors drop the
last plane of the 11^3 patch, as they would in the seed's Lasagne layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcascade.networks import nicms
from jaxcascade.errors import UserError
from jaxcascade.networks.layers import (COMPUTE_DTYPES, FLOAT32, Conv3D, Window, dense_max_pool, dilations,
                                       fused_dense_head, glorot, max_pool_2x2x2, read_by_window, receptive_halo)


class Valverde2017(nnx.Module):
    """The seed's CNN; `padding` picks the faithful ('SAME') or dense-exact ('VALID') variant."""

    def __init__(
        self,
        in_channels: int,
        *,
        padding: str = "VALID",
        patch_size: int = 11,
        dropout_rate: float = 0.5,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-4,
        conv_implementation: str = "auto",
        compute_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        conv = dict(kernel_size=3, padding=padding, implementation=conv_implementation, compute_dtype=compute_dtype,
                    rngs=rngs)
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, rngs=rngs)
        self.conv1 = Conv3D(in_channels, 32, **conv)
        self.bn1 = nnx.BatchNorm(32, **bn)
        self.conv2 = Conv3D(32, 64, **conv)
        self.bn2 = nnx.BatchNorm(64, **bn)
        self.dropout = nnx.Dropout(dropout_rate)
        flat_size = _flat_size(patch_size, padding) * 64
        self.dense1 = nnx.Linear(flat_size, 256, kernel_init=glorot, precision=FLOAT32, rngs=rngs)
        self.out = nnx.Linear(256, 2, kernel_init=glorot, precision=FLOAT32, rngs=rngs)
        self.padding = padding
        self.patch_size = patch_size
        self.pooled_size = _pooled_size(patch_size, padding)

    def __call__(self, patches, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """(batch, p, p, p, channels) patches -> (batch, 2) logits."""
        # Tap gathers (convs.conv3d) where they measured faster: conv1 in float32 training (its input is data,
        # never differentiated; in inference the patch gather would fuse into it; bfloat16 steps were 1.6x
        # slower with it), conv2 in inference (a pool's output).
        gather_conv1 = train and self.conv1.compute_dtype == "float32"
        x = jax.nn.relu(self.bn1(self.conv1(patches, gather_taps=gather_conv1), use_running_average=not train))
        x = max_pool_2x2x2(x)
        x = jax.nn.relu(self.bn2(self.conv2(x, gather_taps=not train), use_running_average=not train))
        x = max_pool_2x2x2(x)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.dense1(x))
        return self.out(x)

    @property
    def windows(self) -> tuple[Window, ...]:
        """conv 3, pool 2, conv 3, pool 2, then dense1 seen as a pooled_size^3 convolution."""
        return (Window(3), Window(2, 2), Window(3), Window(2, 2), Window(self.pooled_size))

    @property
    def dense_halo(self) -> int | None:
        """Extra input voxels per axis a dense output block needs; None (no exact dense form) with SAME padding."""
        return receptive_halo(self.windows) if self.padding == "VALID" else None

    def dense(self, tiles, where=None):
        """Logits at every position of (B, T + halo, T + halo, T + halo, C) tiles -> (B, T, T, T, 2).

        Output [b, i, j, k] is exactly `self(patch)` for the patch whose first
        voxel is tiles[b, i, j, k] ("a trous" / filter rarefaction): pooling
        runs with stride 1 and every later layer is dilated by the stride
        accumulated before it (2 after the first pool, 4 after the second), the
        dense layers become convolutions. Only VALID padding makes this exact.

        where: None, or a bool (B, T, T, T) of the positions to classify: logits
        there as without it, 0 elsewhere. Where jaxcascade's CPU kernels run,
        both convolutions and the head then compute only what those positions read.
        """
        if self.dense_halo is None:
            raise ValueError("dense evaluation is exact only for VALID padding")
        conv1, pool1, conv2, pool2, flat = dilations(self.windows)  # 1, 1, 2, 2, 4
        # The outputs of conv2 and conv1 that the kept positions read, layer by layer back from the head (one
        # tap when size == 1): conv2's through pool2, conv1's through pool1 and conv2's taps.
        keep2 = keep1 = None
        if where is not None and self.pooled_size == 1:
            _, pool1_window, conv2_window, pool2_window, _ = self.windows
            keep2 = read_by_window(where, pool2_window.size, pool2)
            keep1 = read_by_window(read_by_window(keep2, conv2_window.size, conv2), pool1_window.size, pool1)
        x = jax.nn.relu(self.bn1(self.conv1(tiles, dilation=conv1, keep=keep1), use_running_average=True))
        x = dense_max_pool(x, pool1)
        x = jax.nn.relu(self.bn2(self.conv2(x, dilation=conv2, gather_taps=True, keep=keep2), use_running_average=True))
        x = dense_max_pool(x, pool2)
        size = self.pooled_size
        # The patch network flattens (size, size, size, 64) in C order: dense1 is
        # a size^3 convolution whose taps sit `flat` voxels apart.
        kernel = self.dense1.kernel[...].reshape(size, size, size, 64, -1)

        def head(x):
            x = self.conv1.apply(x, kernel, dilation=flat, padding="VALID")
            logits = self.out(jax.nn.relu(x + self.dense1.bias[...]))
            return logits if where is None else jnp.where(where[..., None], logits, 0)

        if size == 1 and self.conv1.compute_dtype == "float32":
            # Both dense layers in one primitive: on CPU a C++ kernel that keeps the hidden layer in registers
            # (cpu_kernel.dense_head); None where jaxcascade's kernels are off.
            fused = fused_dense_head(x, self.dense1.kernel[...], self.dense1.bias[...], self.out.kernel[...],
                                     self.out.bias[...], keep=where)
            if fused is not None:
                return fused
        return head(x)


def _pooled_size(patch_size: int, padding: str) -> int:
    """Spatial size after the second pool (11 -> 2 with SAME, 11 -> 1 with VALID)."""
    size = patch_size
    for _ in range(2):
        if padding == "VALID":
            size -= 2
        size //= 2
    if size < 1:
        raise ValueError(f"patch_size {patch_size} is too small for this network")
    return size


def _flat_size(patch_size: int, padding: str) -> int:
    return _pooled_size(patch_size, padding) ** 3


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """How to build a named network, and what it is."""

    name: str
    build: Callable  # (in_channels, model_config, rngs, compute_dtype) -> nnx.Module
    parameters: int  # trainable parameters with 2 input channels and 11^3 patches (checked by the tests)
    description: str


NETWORKS = {
    "valverde2017": NetworkSpec(
        "valverde2017",
        lambda channels, cfg, rngs, dtype: Valverde2017(channels, padding="SAME", **_kwargs(cfg, dtype), rngs=rngs),
        parameters=189_154,
        description="the paper's network with SAME padding, as the seed code built it",
    ),
    "valverde2017_valid": NetworkSpec(
        "valverde2017_valid",
        lambda channels, cfg, rngs, dtype: Valverde2017(channels, padding="VALID", **_kwargs(cfg, dtype), rngs=rngs),
        parameters=74_466,
        description="the paper's layers with VALID convolutions (exact dense inference)",
    ),
    "nicms": NetworkSpec(
        "nicms",
        lambda channels, cfg, rngs, dtype: nicms.NicMS(channels, **_kwargs(cfg, dtype), rngs=rngs),
        parameters=470_082,
        description="nicMSlesions' Keras network (two conv pairs, PReLU, three dense layers); see interop.py",
    ),
}


def _kwargs(model_config, compute_dtype: str) -> dict:
    return dict(
        patch_size=model_config.patch_size,
        dropout_rate=model_config.dropout_rate,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        conv_implementation=model_config.conv_implementation,
        compute_dtype=compute_dtype,
    )


def build_network(model_config, in_channels: int, seed: int, compute_dtype: str = "float32") -> nnx.Module:
    """Instantiate the configured network with deterministic initial weights (float32 whatever compute_dtype)."""
    if model_config.network not in NETWORKS:
        raise KeyError(model_config.network)
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"--config.compute_dtype={compute_dtype}: use one of {', '.join(COMPUTE_DTYPES)}")
    return NETWORKS[model_config.network].build(in_channels, model_config, nnx.Rngs(params=seed), compute_dtype)


def abstract_network(config) -> nnx.Module:
    """The network a whole config describes, shapes only: eval_shape traces the initialisers without running
    them (0.65 s of a CLI call's start-up otherwise)."""
    return nnx.eval_shape(lambda: build_network(config.model, len(config.data.modalities), 0, config.compute_dtype))


def variables_template(config) -> dict:
    """The variables (names, shapes, dtypes; no values) of the network a whole config describes, as
    `split_model` gives them: what a stage's stored weights must match."""
    return split_model(abstract_network(config))[1]


def count_parameters(module: nnx.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are not counted)."""
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


def split_model(model: nnx.Module):
    """(graphdef, variables) with variables = {'params': ..., 'batch_stats': ...} as pure dicts."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
