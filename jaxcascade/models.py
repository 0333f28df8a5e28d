"""Patch classifiers (Flax NNX modules) and the registry that names them.

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

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcascade import convs
from jaxcascade import nicms  # circular but safe: nicms uses models.* only at call time

# Lasagne's defaults, which the seed code used: GlorotUniform weights, and
# batch_norm(alpha=0.1, epsilon=1e-4), i.e. running averages with momentum 0.9.
_glorot = jax.nn.initializers.glorot_uniform()


class Conv3D(nnx.Module):
    """A k^3 convolution whose arithmetic goes through `convs.conv3d`."""

    def __init__(self, in_features, out_features, *, kernel_size=3, padding="VALID", implementation="auto", rngs):
        shape = (kernel_size,) * 3 + (in_features, out_features)
        self.kernel = nnx.Param(_glorot(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.padding = padding
        self.implementation = implementation

    def __call__(self, x, *, dilation: int = 1):
        y = convs.conv3d(x, self.kernel[...], padding=self.padding, dilation=dilation,
                         implementation=self.implementation)
        return y + self.bias[...]


def max_pool_2x2x2(x):
    """A 2^3 max-pool with stride 2 over (B, D, H, W, C), odd trailing planes dropped (Lasagne's ignore_border).

    Written as crop + reshape + max rather than `reduce_window`: the same
    forward values, but its gradient is an elementwise mask, whereas
    reduce_window's select-and-scatter gradient is several times slower on
    XLA:CPU (benchmarks/train_step.py). Gradients differ only for tied maxima,
    which after a ReLU are zeros whose gradient the ReLU drops anyway.
    """
    batch, depth, height, width, channels = x.shape
    x = x[:, : depth // 2 * 2, : height // 2 * 2, : width // 2 * 2]
    x = x.reshape(batch, depth // 2, 2, height // 2, 2, width // 2, 2, channels)
    return x.max(axis=(2, 4, 6))


def _dense_max_pool(x, dilation: int):
    """A 2^3 max-pool evaluated at every position (stride 1), taps `dilation` apart."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 2, 1), (1, 1, 1, 1, 1), "VALID",
        window_dilation=(1, dilation, dilation, dilation, 1),
    )


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
        rngs: nnx.Rngs,
    ):
        conv = dict(kernel_size=3, padding=padding, implementation=conv_implementation, rngs=rngs)
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, rngs=rngs)
        self.conv1 = Conv3D(in_channels, 32, **conv)
        self.bn1 = nnx.BatchNorm(32, **bn)
        self.conv2 = Conv3D(32, 64, **conv)
        self.bn2 = nnx.BatchNorm(64, **bn)
        self.dropout = nnx.Dropout(dropout_rate)
        flat_size = _flat_size(patch_size, padding) * 64
        self.dense1 = nnx.Linear(flat_size, 256, kernel_init=_glorot, rngs=rngs)
        self.out = nnx.Linear(256, 2, kernel_init=_glorot, rngs=rngs)
        self.padding = padding
        self.patch_size = patch_size
        self.pooled_size = _pooled_size(patch_size, padding)

    def __call__(self, patches, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """(batch, p, p, p, channels) patches -> (batch, 2) logits."""
        x = jax.nn.relu(self.bn1(self.conv1(patches), use_running_average=not train))
        x = max_pool_2x2x2(x)
        x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=not train))
        x = max_pool_2x2x2(x)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.dense1(x))
        return self.out(x)

    @property
    def dense_halo(self) -> int:
        """Extra input voxels per axis a dense output block needs (receptive field - 1)."""
        return 2 + 1 + 4 + 2 + 4 * (self.pooled_size - 1)

    def dense(self, tiles):
        """Logits at every position of (B, T + halo, T + halo, T + halo, C) tiles -> (B, T, T, T, 2).

        Output [b, i, j, k] is exactly `self(patch)` for the patch whose first
        voxel is tiles[b, i, j, k] ("a trous" / filter rarefaction): pooling
        runs with stride 1 and every later layer is dilated by the stride
        accumulated before it (2 after the first pool, 4 after the second), the
        dense layers become convolutions. Only VALID padding makes this exact.
        """
        if self.padding != "VALID":
            raise ValueError("dense evaluation is exact only for VALID padding")
        x = jax.nn.relu(self.bn1(self.conv1(tiles), use_running_average=True))
        x = _dense_max_pool(x, 1)
        x = jax.nn.relu(self.bn2(self.conv2(x, dilation=2), use_running_average=True))
        x = _dense_max_pool(x, 2)
        size = self.pooled_size
        # The patch network flattens (size, size, size, 64) in C order: dense1 is
        # a size^3 convolution whose taps sit 4 voxels apart.
        kernel = self.dense1.kernel[...].reshape(size, size, size, 64, -1)
        x = convs.conv3d(x, kernel, padding="VALID", dilation=4, implementation=self.conv1.implementation)
        x = jax.nn.relu(x + self.dense1.bias[...])
        return self.out(x)


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
    """How to build a named network and what it guarantees."""

    name: str
    build: callable
    dense_exact: bool  # output at a voxel independent of padding/position inside the patch
    description: str


NETWORKS = {
    "valverde2017": NetworkSpec(
        "valverde2017",
        lambda channels, cfg, rngs: Valverde2017(channels, padding="SAME", **_kwargs(cfg), rngs=rngs),
        dense_exact=False,
        description="the paper's network with SAME padding, as the seed code built it",
    ),
    "valverde2017_valid": NetworkSpec(
        "valverde2017_valid",
        lambda channels, cfg, rngs: Valverde2017(channels, padding="VALID", **_kwargs(cfg), rngs=rngs),
        dense_exact=True,
        description="the paper's layers with VALID convolutions (exact dense inference)",
    ),
    "nicms": NetworkSpec(
        "nicms",
        lambda channels, cfg, rngs: nicms.NicMS(channels, **_kwargs(cfg), rngs=rngs),
        dense_exact=False,  # per-position PReLU slopes and SAME padding: patch-wise only
        description="nicMSlesions' Keras network (two conv pairs, PReLU, three dense layers); see interop.py",
    ),
}


def _kwargs(model_config) -> dict:
    return dict(
        patch_size=model_config.patch_size,
        dropout_rate=model_config.dropout_rate,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        conv_implementation=model_config.conv_implementation,
    )


def build_network(model_config, in_channels: int, seed: int) -> nnx.Module:
    """Instantiate the configured network with deterministic initial weights."""
    if model_config.network not in NETWORKS:
        raise KeyError(model_config.network)
    return NETWORKS[model_config.network].build(in_channels, model_config, nnx.Rngs(params=seed))


def count_parameters(module: nnx.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are not counted)."""
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))
