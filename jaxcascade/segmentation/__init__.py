"""Segmenting: a trained `Stage`, the two-stage `Cascade`, the inference kernels (patch-wise and exact dense
whole-volume), post-processing, one subject from its files (`files`) and whole studies (`study`).

May import `jaxcascade.storage` and below (never `training`).
"""
