"""jaxcascade's C++ CPU kernels (cpu_kernel.py): the convolution is the same cross-correlation as lax.conv,
deterministic and differentiable; the dense head and pool equal their XLA forms; they are built on first use and
replaced by the GEMM formulations where they are off or cannot be built."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcascade.ops import convs, cpu_kernel

ROOT = Path(__file__).resolve().parents[1]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _lax(x, kernel, dilation):
    return convs.conv3d(x, kernel, dilation=dilation, implementation="lax")


def test_the_kernel_builds_on_this_machine():
    # CI and the developers' machines have a C++ compiler: a build failure here must not pass unnoticed
    # as a silent fallback.
    assert cpu_kernel.available(), "the CPU kernel did not build (see the warning above)"


def test_used_by_default_on_avx512_and_avx2_and_the_switch_decides():
    avx512, avx2, sse = {"sse2", "avx2", "fma", "avx512f"}, {"sse2", "avx2", "fma"}, {"sse2", "sse4_2"}
    assert cpu_kernel.wanted("", "x86_64", avx512) and cpu_kernel.wanted("", "x86_64", avx2)
    assert not cpu_kernel.wanted("", "x86_64", sse) and not cpu_kernel.wanted("", "aarch64", set())
    assert cpu_kernel.wanted(" 1", "aarch64", set()) and cpu_kernel.wanted("on", "x86_64", sse)
    assert not cpu_kernel.wanted("0", "x86_64", avx512) and not cpu_kernel.wanted("off", "x86_64", avx2)
    # A variant asked for by name is used (CI tests the AVX2 one on AVX-512 CPUs), unless the CPU cannot run it.
    assert cpu_kernel.wanted("", "x86_64", avx512, "avx2") and cpu_kernel.wanted("", "x86_64", sse, "generic")
    assert not cpu_kernel.wanted("", "x86_64", avx2, "avx512") and not cpu_kernel.wanted("", "x86_64", avx2, "sve")
    assert not cpu_kernel.wanted("0", "x86_64", avx512, "avx2")


# (input NDHWC, out channels, kernel size, dilation): each register width (16-64 channels), 2-64 input channels,
# dilations of the dense kernel, odd extents, a 5^3 kernel; then rows of >= 8 outputs over >= 16 channels, which
# run as Winograd tiles (the dense form's conv2), with tiles cut by the output's end on every axis.
CASES = [
    ((2, 7, 8, 13, 3), 16, 3, 1),
    ((1, 9, 9, 11, 32), 64, 3, 2),
    ((3, 6, 6, 6, 5), 48, 3, 1),
    ((2, 10, 9, 12, 64), 32, 3, 4),
    ((1, 8, 7, 9, 2), 32, 5, 1),
    ((1, 11, 10, 30, 32), 64, 3, 2),
    ((2, 6, 7, 12, 16), 48, 3, 1),
    ((1, 10, 12, 17, 32), 16, 3, 3),
]


@pytest.mark.parametrize("shape,out_channels,kernel_size,dilation", CASES)
def test_direct_equals_lax_convolution(shape, out_channels, kernel_size, dilation):
    x = _random(shape, 0)
    kernel = _random((kernel_size,) * 3 + (shape[-1], out_channels), 1) * 0.2
    direct = jax.jit(lambda x, k: convs.conv3d(x, k, dilation=dilation, implementation="direct"))(x, kernel)
    reference = jax.jit(lambda x, k: _lax(x, k, dilation))(x, kernel)
    assert direct.shape == reference.shape
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(direct - reference))) <= 2e-6 * scale * np.sqrt(kernel_size**3 * shape[-1])


def test_winograd_weights_are_transformed_again_when_one_weight_changes():
    # The kernel keeps the last weights' Winograd transform for the next call; new weights must not reuse it.
    x = _random((1, 6, 6, 12, 16), 11)  # rows of 10 outputs over 16 channels: Winograd tiles
    first = _random((3, 3, 3, 16, 16), 12)
    second = first.at[1, 2, 0, 5, 7].add(1.0)
    convolve = jax.jit(lambda x, k: convs.conv3d(x, k, implementation="direct"))
    for kernel in (first, second, first):
        reference = _lax(x, kernel, 1)
        assert float(jnp.max(jnp.abs(convolve(x, kernel) - reference))) <= 1e-5 * float(jnp.max(jnp.abs(reference)))


@pytest.mark.parametrize("width", range(1, 8))
def test_every_row_tail_width(width):
    # The kernel keeps 6 outputs of 64 channels in registers; rows of 1-7 outputs end in each narrower block.
    x = _random((1, 3, 3, width + 2, 4), width)
    kernel = _random((3, 3, 3, 4, 64), 7)
    direct = convs.conv3d(x, kernel, implementation="direct")
    np.testing.assert_allclose(direct, _lax(x, kernel, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,dilation,padding", [(3, 1, 1), (3, 1, 2), (3, 2, 3), (5, 1, 4)])
def test_zero_padding_read_in_place(kernel_size, dilation, padding):
    # The input gradient reads the cotangent with zeros around it, skipping taps that fall on them.
    x = _random((2, 5, 4, 9, 32), padding)
    kernel = _random((kernel_size,) * 3 + (32, 48), 8) * 0.1
    got = jax.jit(lambda x, k: cpu_kernel.ffi_conv3d(x, k, dilation, padding))(x, kernel)
    pads = ((0, 0),) + ((padding, padding),) * 3 + ((0, 0),)
    np.testing.assert_allclose(got, _lax(jnp.pad(x, pads), kernel, dilation), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("voxels,hidden,outputs", [(1, 64, 2), (7, 128, 3), (1030, 256, 2), (13, 64, 4)])
def test_dense_head_equals_its_two_layers(voxels, hidden, outputs):
    # Voxel counts around the kernel's blocks of 4 and tasks of 1,024.
    x, w1, b1 = _random((voxels, 64), 1), _random((64, hidden), 2) * 0.2, _random((hidden,), 3) * 0.2
    w2, b2 = _random((hidden, outputs), 4) * 0.2, _random((outputs,), 5)
    got = jax.jit(cpu_kernel.dense_head)(x, w1, b1, w2, b2)
    hidden_layer = jax.nn.relu(jnp.dot(x, w1, precision="highest") + b1)
    np.testing.assert_allclose(got, jnp.dot(hidden_layer, w2, precision="highest") + b2, rtol=1e-5, atol=1e-5)
    assert not cpu_kernel.head_supported(64, 96, 2) and not cpu_kernel.head_supported(64, 64, 5)


@pytest.mark.parametrize("shape,dilation", [((2, 5, 6, 7, 32), 1), ((1, 9, 8, 10, 64), 2), ((3, 6, 6, 6, 16), 4)])
def test_max_pool_equals_xla_bit_for_bit(shape, dilation):
    x = _random(shape, dilation)
    window = (1, 2, 2, 2, 1)
    reference = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1,) * 5, "VALID",
                                      window_dilation=(1, dilation, dilation, dilation, 1))
    assert np.array_equal(jax.jit(cpu_kernel.max_pool, static_argnums=1)(x, dilation), reference)


def test_vmap_folds_into_one_kernel_call_and_loops_only_per_example():
    x, kernel = _random((3, 2, 6, 6, 6, 4), 9), _random((3, 3, 3, 4, 16), 10)
    conv = jax.jit(jax.vmap(lambda x: convs.conv3d(x, kernel, implementation="direct")))
    np.testing.assert_allclose(conv(x), jnp.stack([_lax(example, kernel, 1) for example in x]), rtol=1e-5, atol=1e-5)
    text = conv.lower(x).as_text()  # the vmapped axis joined the batch: one call, no loop
    assert text.count(f"@{cpu_kernel.TARGET}(") == 1 and "stablehlo.while" not in text
    pooled = jax.jit(jax.vmap(lambda x: cpu_kernel.max_pool(x, 1)))(jnp.tile(x, (1, 1, 1, 1, 1, 4)))
    assert pooled.shape == (3, 2, 5, 5, 5, 16)
    # Per-example kernel gradients sum over each example's own positions: one kernel call per example.
    loss = lambda k, x: jnp.sum(convs.conv3d(x[None], k, implementation="direct") ** 2)  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))
    assert "stablehlo.while" in per_example.lower(kernel, x[:, 0]).as_text()
    want = jnp.stack([jax.grad(lambda k: jnp.sum(_lax(example[None], k, 1) ** 2))(kernel) for example in x[:, 0]])
    np.testing.assert_allclose(per_example(kernel, x[:, 0]), want, rtol=1e-4, atol=1e-4)


def test_direct_is_deterministic_and_differentiable():
    x, kernel = _random((2, 8, 8, 8, 32), 3), _random((3, 3, 3, 32, 32), 4) * 0.1
    run = jax.jit(lambda x, k: convs.conv3d(x, k, dilation=2, implementation="direct"))
    assert np.array_equal(run(x, kernel), run(x, kernel))

    def loss(implementation):
        return lambda x, k: jnp.sum(jnp.sin(convs.conv3d(x, k, dilation=2, implementation=implementation)))

    got = jax.grad(loss("direct"), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss("lax"), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_auto_uses_the_kernel_for_float32_forward_and_gradients():
    x, kernel = _random((4, 11, 11, 11, 2), 5), _random((3, 3, 3, 2, 32), 6)

    def lowered(function, **options):
        return jax.jit(function).lower(x, kernel).as_text()

    forward = lowered(lambda x, k: convs.conv3d(x, k))
    gradient = lowered(jax.grad(lambda x, k: jnp.sum(convs.conv3d(x, k) ** 2), argnums=1))
    bfloat16 = lowered(lambda x, k: convs.conv3d(x, k, compute_dtype=jnp.bfloat16))
    assert f"@{cpu_kernel.TARGET}(" in forward
    assert f"@{cpu_kernel.GRADIENT_TARGET}(" in gradient
    assert cpu_kernel.TARGET not in bfloat16
    # bfloat16 products, and output widths the kernel has no registers for, keep the GEMM formulations.
    assert not cpu_kernel.supports((4, 11, 11, 11, 2), (3, 3, 3, 2, 8), jnp.float32)
    assert not cpu_kernel.supports((4, 11, 11, 11, 2), (3, 3, 3, 2, 32), jnp.bfloat16)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | env, timeout=300)


PROBE = """
    import jax, numpy as np
    from jaxcascade.ops import convs, cpu_kernel
    x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 9, 32)).astype(np.float32))
    k = jax.numpy.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 32, 64)).astype(np.float32))
    auto = convs.conv3d(x, k, dilation=2)
    gemm = convs.conv3d(x, k, dilation=2, implementation="gather")
    print(cpu_kernel.available(), bool(np.array_equal(auto, gemm)))
    try:
        convs.conv3d(x, k, implementation="direct")
    except ValueError as error:
        print("refused:", error)
"""


def test_turned_off_the_results_are_the_gemm_formulations_bit_for_bit():
    result = _python(PROBE, JAXCASCADE_CPU_KERNEL="0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "False True", result.stdout
    assert lines[1].startswith("refused: the CPU kernel cannot run"), result.stdout
    assert "warning" not in result.stderr


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    result = _python(PROBE, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "False True", result.stdout
    warnings = [line for line in result.stderr.splitlines() if "CPU convolution kernels are unavailable" in line]
    assert len(warnings) == 1 and "false failed" in warnings[0], result.stderr
    assert not list(tmp_path.rglob("*.so*")), "no partial library may be left behind"


def test_a_fresh_build_lands_whole_in_the_user_cache(fresh_kernel_build):
    """A process builds the kernels with the real compiler into an empty XDG_CACHE_HOME (conftest's fixture,
    whose library tests/test_kernel_build.py reuses)."""
    result, cache_home = fresh_kernel_build
    assert result.returncode == 0, result.stderr
    built, folder = result.stdout.split()
    assert built == "True" and Path(folder).is_relative_to(cache_home)
    # The library, its checksum and the lock: no temporary left (tests/test_kernel_build.py tests the cache).
    assert sorted(p.name for p in Path(folder).iterdir()) == [".lock", "libjaxcascade.so", "libjaxcascade.so.sha256"]
    assert oct(Path(folder).stat().st_mode & 0o777) == oct(0o700)  # the user's cache is the user's alone
