"""Operations the networks are built from: 3D convolutions behind one function (`convs`), jaxcascade's own
C++ CPU kernels (`kernels/*.cc`) as JAX primitives (`conv_primitives`, `cpu_kernel`: every JAX
transformation composes through them), and the kernels' build and cache (`kernel_build`).

May import `jaxcascade.runtime` and `jaxcascade.errors` only.
"""
