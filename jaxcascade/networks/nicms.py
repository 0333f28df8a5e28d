"""nicMSlesions' patch classifier (Valverde et al.'s Keras successor of the 2017 CNN).

The layers, named as in nicMSlesions' Keras models so that an imported file
maps one to one (see `interop.py`):
    conv1_1 3^3 32 + bn_1_1 + PReLU, conv1_2 3^3 32 + bn_1_2 + PReLU, maxpool 2,
    conv2_1 3^3 64 + bn_2_1 + PReLU, conv2_2 3^3 64 + bn_2_2 + PReLU, maxpool 2,
    flatten, [dropout, dense (256, 128, 64) + PReLU] x 3, out 2 (softmax).
Convolutions are SAME-padded and every convolutional PReLU has one slope per
element (channel *and* position), as Keras' PReLU does without shared axes. The
output therefore depends on where a voxel sits inside the patch: this network
runs patch-wise only (dense_exact=False in the registry).

Patches come in channels-last like every jaxcascade network; Keras computed in
channels-first, which matters only at the flatten (see `_flatten_channels_first`).

At inference on a CPU with jaxcascade's kernels on, the four convolutions run as one
C++ kernel that takes each patch through all of them in cache and skips the outputs
the pools drop (`ops.patch_features`); training, bfloat16 and the kernels off run
layer by layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcascade.networks.layers import FLOAT32, Conv3D, PReLU, glorot, max_pool_2x2x2
from jaxcascade.ops import cpu_kernel, patch_features


def _flatten_channels_first(x):
    """Keras flattened the channels-first (C, D, H, W) tensor in C order; d1's rows follow that order."""
    return jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)


class NicMS(nnx.Module):
    """nicMSlesions' CNN on (batch, p, p, p, channels) patches -> (batch, 2) logits.

    Initialised with Keras' defaults (glorot_uniform kernels, zero biases, zero
    PReLU slopes) for training from scratch; an imported model overwrites them all.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        patch_size: int = 11,
        dropout_rate: float = 0.5,
        bn_momentum: float = 0.99,
        bn_epsilon: float = 1e-3,
        conv_implementation: str = "auto",
        compute_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        pooled = patch_size // 2
        flat_size = (pooled // 2) ** 3 * 64
        if flat_size == 0:
            raise ValueError(f"patch_size {patch_size} is too small for this network")
        self.patch_size = patch_size
        conv = dict(kernel_size=3, padding="SAME", implementation=conv_implementation, compute_dtype=compute_dtype,
                    rngs=rngs)
        bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, rngs=rngs)
        # Keras' slopes are (C, D, H, W); they are stored channels-last to match the activations.
        self.conv1_1 = Conv3D(in_channels, 32, **conv)
        self.bn_1_1 = nnx.BatchNorm(32, **bn)
        self.prelu_conv1_1 = PReLU((patch_size,) * 3 + (32,))
        self.conv1_2 = Conv3D(32, 32, **conv)
        self.bn_1_2 = nnx.BatchNorm(32, **bn)
        self.prelu_conv1_2 = PReLU((patch_size,) * 3 + (32,))
        self.conv2_1 = Conv3D(32, 64, **conv)
        self.bn_2_1 = nnx.BatchNorm(64, **bn)
        self.prelu_conv2_1 = PReLU((pooled,) * 3 + (64,))
        self.conv2_2 = Conv3D(64, 64, **conv)
        self.bn_2_2 = nnx.BatchNorm(64, **bn)
        self.prelu_conv2_2 = PReLU((pooled,) * 3 + (64,))
        self.dropout = nnx.Dropout(dropout_rate)
        self.d1 = nnx.Linear(flat_size, 256, kernel_init=glorot, precision=FLOAT32, rngs=rngs)
        self.prelu_d1 = PReLU((256,))
        self.d2 = nnx.Linear(256, 128, kernel_init=glorot, precision=FLOAT32, rngs=rngs)
        self.prelu_d2 = PReLU((128,))
        self.d3 = nnx.Linear(128, 64, kernel_init=glorot, precision=FLOAT32, rngs=rngs)
        self.prelu_d3 = PReLU((64,))
        self.out = nnx.Linear(64, 2, kernel_init=glorot, precision=FLOAT32, rngs=rngs)

    @property
    def dense_halo(self) -> None:
        """No exact dense form: SAME padding and per-position PReLU slopes."""
        return None

    def __call__(self, patches, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """(batch, p, p, p, channels) patches -> (batch, 2) logits (Keras applied the softmax in `out`)."""
        layers = None if train else self._fused_layers(patches)
        x = self._convolutions(patches, train) if layers is None else patch_features.features(patches, layers)
        x = _flatten_channels_first(x)
        for dense, prelu in ((self.d1, self.prelu_d1), (self.d2, self.prelu_d2), (self.d3, self.prelu_d3)):
            x = prelu(dense(self.dropout(x, deterministic=not train, rngs=rngs)))
        return self.out(x)

    def _convolutions(self, patches, train: bool):
        """The four convolutions layer by layer (Keras' order), batch-normalised with the batch's statistics
        when training."""
        average = not train
        x = self.prelu_conv1_1(self.bn_1_1(self.conv1_1(patches), use_running_average=average))
        x = self.prelu_conv1_2(self.bn_1_2(self.conv1_2(x), use_running_average=average))
        x = max_pool_2x2x2(x)  # Keras MaxPooling3D: 2, stride 2, valid (11 -> 5 -> 2)
        # Only conv2_1 reads a pool's output, the one input a tap gather may read (convs.conv3d).
        x = self.prelu_conv2_1(self.bn_2_1(self.conv2_1(x, gather_taps=average), use_running_average=average))
        x = self.prelu_conv2_2(self.bn_2_2(self.conv2_2(x), use_running_average=average))
        return max_pool_2x2x2(x)

    def _fused_layers(self, patches):
        """The layers for the one-kernel form (`_inference_layers`), or None where inference runs layer by
        layer: anything but float32 throughout and the default implementation, or jaxcascade's CPU kernels
        off (the layer-by-layer results then stay bit-identical)."""
        if not (self.conv1_1.implementation == "auto" and self.conv1_1.compute_dtype == "float32"
                and patches.dtype == jnp.float32 and cpu_kernel.enabled()):
            return None
        layers = self._inference_layers()
        return layers if patch_features.supported(patches.shape, layers) else None

    def _inference_layers(self):
        """Each convolution's (kernel, scale, shift, slopes), its bias and running batch norm folded into the
        scale and shift: (conv + b - mean) * rsqrt(var + eps) * gamma + beta = conv * scale + shift."""
        layers = []
        for conv, bn, prelu in ((self.conv1_1, self.bn_1_1, self.prelu_conv1_1),
                                (self.conv1_2, self.bn_1_2, self.prelu_conv1_2),
                                (self.conv2_1, self.bn_2_1, self.prelu_conv2_1),
                                (self.conv2_2, self.bn_2_2, self.prelu_conv2_2)):
            scale = jax.lax.rsqrt(bn.var[...] + bn.epsilon) * bn.scale[...]
            shift = (conv.bias[...] - bn.mean[...]) * scale + bn.bias[...]
            layers.append((conv.kernel[...], scale, shift, prelu.alpha[...]))
        return layers
