"""Sphinx configuration: Markdown pages (myst-parser) and an API reference from the docstrings.

Build (strict, as CI does): sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import jaxcascade  # noqa: E402

project = "jaxcascade"
author = "the jaxcascade authors"
copyright = "the jaxcascade authors"
release = version = jaxcascade.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]  # the CHANGELOG's version headings start at level 2

html_theme = "furo"
html_title = f"jaxcascade {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Nothing is downloaded while building (no intersphinx), so names from other packages in type hints
# cannot resolve; jaxcascade's own names must.
nitpick_ignore_regex = [
    ("py:.*", r"(numpy|np|jax|jnp|flax|nnx|nibabel|nib|ml_collections|optax|orbax|pathlib|os|collections|typing)\b.*"),
    ("py:.*", r"(Path|PathLike|Callable|Mapping|Sequence|Iterable|Iterator|Any|ConfigDict|ndarray|Array)"),
    ("py:class", r"(optional|default.*|.*\| None)"),
]
