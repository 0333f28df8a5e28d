"""Operations the networks are built from: 3D convolutions behind one function, and jaxcascade's own C++
CPU kernels (`kernels/*.cc`), their build and cache (`kernel_build`) and their JAX bindings (`cpu_kernel`).

May import `jaxcascade.runtime` and `jaxcascade.errors` only.
"""
