"""The networks: the paper's patch classifier and its variants (`models`), nicMSlesions' (`nicms`), and the
layers they share (`layers`). Flax NNX modules; no data loading, no files.

May import `jaxcascade.ops` and below (`runtime`, `errors`).
"""
