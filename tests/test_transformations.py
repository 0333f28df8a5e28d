"""JAX's transformations through jaxcascade's C++ kernels (cpu_kernel.py, conv_primitives.py), to any order.

The matrix: grad, jvp, vjp, linearize, hessian, jacfwd, jacrev, vmap (over the data, the weights, both),
vmap(grad), jit, checkify and remat, for each kernel (the 3D convolution and its gradients, the dense head, the
dilated max-pool), in three modes: the kernel on; off (JAXCASCADE_CPU_KERNEL=0, read at every trace and
lowering, so it switches within this process for functions traced afresh); and the kernel's primitives lowered
without it (what a failed build gives). Each result is compared with the same computation in float64 (the
pure-JAX forms under jax.enable_x64). The kernels compute in float32: first-order results within 2e-5 of the
largest reference entry, second order within 5e-5. jax.export for cpu, cuda and tpu, a network's
Hessian-vector product and per-example gradients of the train step's loss complete it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from jaxcascade.ops import convs, cpu_kernel
from jaxcascade.networks import layers, models
from jaxcascade.training import train_steps

MODES = ("kernel", "off", "fallback")
FIRST_ORDER, SECOND_ORDER = 2e-5, 5e-5
SECOND = {"hessian", "hvp"}


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    assert cpu_kernel.available(), "the CPU kernel did not build here"
    if request.param == "off":
        monkeypatch.setenv(cpu_kernel.KERNEL_ENV, "0")
    elif request.param == "fallback":  # traced with the primitives, lowered as where the kernel cannot be built
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    return request.param


def _random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _conv(x, w):
    return convs.conv3d(x, w, dilation=1)


def _head(x, w1, b1, w2, b2):
    fused = layers.fused_dense_head(x, w1, b1, w2, b2)
    return cpu_kernel.head_reference(x, w1, b1, w2, b2) if fused is None else fused


def _pool(x, scale):
    return layers.dense_max_pool(x, 2) * scale  # a second operand, so that vmap(grad) and both-vmapped apply


# kernel -> (array-valued function of two operands, their float32 values, custom-call targets it runs on CPU)
KERNELS = {
    "conv": (_conv, (_random((1, 5, 5, 5, 16), 0), _random((3, 3, 3, 16, 16), 1, 0.1)),
             {cpu_kernel.TARGET, cpu_kernel.GRADIENT_TARGET}),
    "head": (lambda x, w1: _head(x, w1, *HEAD_REST), (_random((5, 64), 2), _random((64, 64), 3, 0.2)),
             {cpu_kernel.HEAD_TARGET}),
    "pool": (_pool, (_random((1, 5, 5, 5, 16), 4), _random((16,), 5)), {cpu_kernel.POOL_TARGET}),
}
HEAD_REST = (_random((64,), 6, 0.2), _random((64, 2), 7, 0.2), _random((2,), 8))


def _transformations(g, a, b):
    """Every transformation of g(a, b) (array-valued) and of the scalar f = sum(tanh(g)), by name."""
    f = lambda a, b: jnp.sum(jnp.tanh(g(a, b)))  # noqa: E731
    ta, tb = jnp.cos(a), jnp.sin(b)  # tangents
    out = g(a, b)
    ct = jnp.cos(out)  # a cotangent
    stacked_a, stacked_b = jnp.stack([a, 2 * a]), jnp.stack([b, -b])
    _, vjp = jax.vjp(g, a, b)
    _, linear = jax.linearize(g, a, b)
    error, checked = checkify.checkify(jax.grad(f, argnums=(0, 1)), errors=checkify.float_checks)(a, b)
    del error  # its presence is the test: checkify traces through the primitives
    return {
        "jit": out,
        "grad": jax.grad(f, argnums=(0, 1))(a, b),
        "jvp": jax.jvp(g, (a, b), (ta, tb)),
        "vjp": vjp(ct),
        "linearize": linear(ta, tb),
        "hessian": jax.hessian(f)(a, b),
        "hvp": jax.jvp(jax.grad(f, argnums=(0, 1)), (a, b), (ta, tb))[1],
        "jacfwd": jax.jacfwd(g)(a, b),
        "jacrev": jax.jacrev(g, argnums=1)(a, b),
        "vmap data": jax.vmap(g, (0, None))(stacked_a, b),
        "vmap weights": jax.vmap(g, (None, 0))(a, stacked_b),
        "vmap both": jax.vmap(g)(stacked_a, stacked_b),
        "vmap(grad)": jax.vmap(jax.grad(f, argnums=(0, 1)))(stacked_a, stacked_b),
        "checkify": checked,
        "remat": jax.grad(jax.checkpoint(f), argnums=(0, 1))(a, b),
    }


def _error(got, want) -> float:
    """Largest deviation relative to the largest reference entry, over a result's arrays."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w)))
                     / max(float(np.max(np.abs(np.asarray(w)))), 1e-30)) for g, w in pairs)


@functools.cache
def _reference(kernel):
    function, operands, _ = KERNELS[kernel]
    with jax.enable_x64(True):
        head_rest = [np.float64(v) for v in HEAD_REST]
        g = (lambda x, w1: cpu_kernel.head_reference(x, w1, *head_rest)) if kernel == "head" else function
        result = jax.jit(functools.partial(_transformations, g))(*(np.float64(v) for v in operands))
        return jax.tree.map(np.asarray, result)


def _report(row: str, errors: dict) -> None:
    """The errors reached, one row of the matrix (shown by `pytest -s`)."""
    print(f"\n{row:18}", "  ".join(f"{name} {error:.1e}" for name, error in errors.items()))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_transformation_through_each_kernel(kernel, mode):
    function, operands, targets = KERNELS[kernel]
    run = jax.jit(functools.partial(_transformations, function))
    text = run.lower(*operands).as_text()
    # The kernel really runs (forward and derivatives), or really does not.
    called = {target for target in cpu_kernel.TARGETS if f"@{target}(" in text}
    assert called == (targets if mode == "kernel" else set()), called
    got, want = run(*operands), _reference(kernel)
    errors = {name: _error(got[name], want[name]) for name in want}
    _report(f"{kernel} {mode}", errors)
    failed = {name: error for name, error in errors.items()
              if not error <= (SECOND_ORDER if name in SECOND else FIRST_ORDER)}
    assert not failed, failed


def test_eager_transformations_raise_nothing():
    # The examples, outside jit: forward mode through the kernel, and forward over reverse.
    x, w = KERNELS["conv"][1]
    f = lambda x: jnp.sum(_conv(x, w))  # noqa: E731
    _, tangent = jax.jvp(f, (x,), (x,))
    _, hvp = jax.jvp(jax.grad(lambda x: f(x) ** 2), (x,), (x,))
    pooled = jax.grad(lambda x: jnp.sum(layers.dense_max_pool(x, 1)))(x)
    np.testing.assert_allclose(tangent, f(x), rtol=1e-5)  # f is linear: f'(x) x = f(x)
    np.testing.assert_allclose(hvp, 2 * f(x) * jax.grad(f)(x), rtol=1e-4, atol=1e-4)
    assert np.all((np.asarray(pooled) >= 0) & (np.asarray(pooled) <= 8)) and float(pooled.sum()) == 4**3 * 16


# --- the convolution family over shapes: the transposes' paddings, flips and channel swaps -------------------


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), size=st.integers(4, 7), in_channels=st.sampled_from([2, 16, 32]),
       out_channels=st.sampled_from([16, 32, 8]), kernel_size=st.integers(2, 3), dilation=st.integers(1, 2),
       same=st.booleans(), seed=st.integers(0, 2**16))
def test_convolution_derivatives_to_second_order_equal_lax(batch, size, in_channels, out_channels, kernel_size,
                                                           dilation, same, seed):
    span = (kernel_size - 1) * dilation
    size = max(size, span + 1)
    x = _random((batch, size, size, size, in_channels), seed)
    w = _random((kernel_size,) * 3 + (in_channels, out_channels), seed + 1, 0.2)
    padding = "SAME" if same else "VALID"

    def second_order(implementation, x, w):
        def f(x, w):
            return jnp.sum(jnp.tanh(convs.conv3d(x, w, padding=padding, dilation=dilation,
                                                 implementation=implementation)))

        tangents = (jnp.cos(x), jnp.sin(w))
        return jax.grad(f, argnums=(0, 1))(x, w), jax.jvp(jax.grad(f, argnums=(0, 1)), (x, w), tangents)[1]

    got = jax.jit(functools.partial(second_order, "auto"))(x, w)
    with jax.enable_x64(True):
        want = jax.jit(functools.partial(second_order, "lax"))(np.float64(x), np.float64(w))
    assert _error(got, want) <= SECOND_ORDER


def test_supports_checks_every_kernel_dimension():
    # A (3, 3, 1) kernel went to the C++ kernel, which refused it: "conv3d: inconsistent shapes".
    x, w = _random((1, 6, 6, 6, 4), 0), _random((3, 3, 1, 4, 16), 1)
    assert not cpu_kernel.supports(x.shape, w.shape, np.float32)
    assert not cpu_kernel.supports(x.shape, (3, 3, 3, 5, 16), np.float32)  # input channels
    assert not cpu_kernel.supports(x.shape, (3, 3, 3, 4, 16), np.float32, padding=3)  # beyond the span
    got = jax.jit(lambda x, w: convs.conv3d(x, w))(x, w)
    np.testing.assert_allclose(got, convs.conv3d(x, w, implementation="lax"), rtol=1e-5, atol=1e-5)


# --- a network: second order, per-example gradients, export -------------------------------------------------


@pytest.fixture(scope="module")
def network():
    from jaxcascade.configs import default

    config = default.get_config()
    graphdef, variables = models.split_model(models.build_network(config.model, 2, 0))
    patches = _random((2, 11, 11, 11, 2), 9)
    labels = np.array([0, 1], np.int32)
    return graphdef, variables, patches, labels


def _loss(graphdef, batch_stats, params, patches, labels):
    """The train step's loss (train_steps.cross_entropy, averaged) of the network in inference mode."""
    model = nnx.merge(graphdef, params, batch_stats)
    return train_steps.cross_entropy(model(patches), labels).mean()


def _network_derivatives(graphdef, variables, patches, labels):
    loss = functools.partial(_loss, graphdef, variables["batch_stats"])
    params = variables["params"]
    direction = jax.tree.map(jnp.cos, params)
    hvp = jax.jvp(lambda p: jax.grad(loss)(p, patches, labels), (params,), (direction,))[1]
    per_example = jax.vmap(jax.grad(loss), (None, 0, 0))(params, patches[:, None], labels[:, None])
    return {"hvp": hvp, "per-example grad": per_example}


@pytest.mark.parametrize("kernel_on", [True, False])
def test_network_hessian_vector_product_and_per_example_gradients(network, kernel_on, monkeypatch):
    graphdef, variables, patches, labels = network
    if not kernel_on:
        monkeypatch.setenv(cpu_kernel.KERNEL_ENV, "0")
    run = jax.jit(functools.partial(_network_derivatives, graphdef))
    assert (f"@{cpu_kernel.GRADIENT_TARGET}(" in run.lower(variables, patches, labels).as_text()) == kernel_on
    got = run(variables, patches, labels)
    with jax.enable_x64(True):
        want = jax.jit(functools.partial(_network_derivatives, graphdef))(
            jax.tree.map(np.float64, variables), np.float64(patches), labels)
    errors = {name: _error(got[name], want[name]) for name in want}
    _report(f"network {'kernel' if kernel_on else 'off'}", errors)
    assert errors["hvp"] <= SECOND_ORDER and errors["per-example grad"] <= FIRST_ORDER, errors


def test_first_and_second_order_export_with_convolutions_off_cpu_and_the_kernel_on_it(network):
    graphdef, variables, patches, labels = network
    loss = functools.partial(_loss, graphdef, variables["batch_stats"])
    gradient = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda params, direction, patches, labels: jax.jvp(
        lambda p: jax.grad(loss)(p, patches, labels), (params,), (direction,))[1])
    # The dense form's gradient: through the dilated pools and the fused head too.
    dense = jax.jit(jax.grad(lambda params, tiles: jnp.sum(jnp.tanh(
        nnx.merge(graphdef, params, variables["batch_stats"]).dense(tiles)))))
    # ... and where it computes only the positions a mask keeps (conv2 and the head skip the rest).
    dense_where = jax.jit(jax.grad(lambda params, tiles, where: jnp.sum(jnp.tanh(
        nnx.merge(graphdef, params, variables["batch_stats"]).dense(tiles, where=where)))))
    where = np.array([[[[True, False], [False, False]], [[False, False], [False, True]]]] * 2)
    params = variables["params"]
    checks = [jax.export.DisabledSafetyCheck.custom_call(target) for target in cpu_kernel.TARGETS]
    convolution = {cpu_kernel.TARGET, cpu_kernel.GRADIENT_TARGET}
    cases = ((gradient, (params, patches, labels), convolution),
             (hvp, (params, params, patches, labels), convolution),
             (dense, (params, patches), convolution | {cpu_kernel.HEAD_TARGET, cpu_kernel.POOL_TARGET}),
             (dense_where, (params, patches, where),
              convolution | {cpu_kernel.WHERE_TARGET, cpu_kernel.HEAD_WHERE_TARGET, cpu_kernel.POOL_TARGET}))
    for function, args, targets in cases:
        for platform in ("cuda", "tpu", "cpu"):
            exported = jax.export.export(function, platforms=(platform,), disabled_checks=checks)(*args)
            text = exported.mlir_module()
            if platform == "cpu":
                called = {target for target in cpu_kernel.TARGETS if f"@{target}(" in text}
                assert "stablehlo.convolution" not in text and called == targets, called
                # The exported module runs here, and agrees with the function it came from.
                assert _error(exported.call(*args), jax.tree.map(np.float64, function(*args))) <= 1e-6
            else:
                assert "stablehlo.convolution" in text and "jaxcascade_" not in text, platform


def test_lowering_for_an_accelerator_never_builds_the_kernel(tmp_path):
    # convs.conv3d used to build the CPU kernel while tracing for any backend: a GPU host compiled it and could
    # warn. Now only lowering for CPU does.
    import subprocess
    import sys

    code = """
import jax, numpy as np
from jaxcascade.ops import convs, cpu_kernel
x, w = np.zeros((1, 6, 6, 6, 4), np.float32), np.zeros((3, 3, 3, 4, 16), np.float32)
f = jax.jit(jax.grad(lambda x, w: convs.conv3d(x, w).sum(), argnums=(0, 1)))
text = jax.export.export(f, platforms=("cuda",))(x, w).mlir_module()
print("convolution" in text, cpu_kernel.available.cache_info().currsize)
"""
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path), "CXX": "/bin/false",
           cpu_kernel.KERNEL_ENV: "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "0"], result.stdout
    assert "warning" not in result.stderr and not list(tmp_path.rglob("kernels"))

