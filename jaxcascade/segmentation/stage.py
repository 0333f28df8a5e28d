"""`Stage`: one trained patch classifier, as the inference kernels take it.

Its own module, below the cascade and the inference kernels that both use it,
so neither has to import the other to name it.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxcascade.storage import model_dir as model_dir_lib, weights
from jaxcascade.networks import models


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained patch classifier; dense_halo is None where it has no exact dense form."""

    graphdef: object
    variables: dict
    patch_size: int
    dense_halo: int | None = None

    @classmethod
    def from_network(cls, model: nnx.Module, variables: dict | None = None) -> "Stage":
        """A stage of a network in memory, with its own variables or the given ones (same structure)."""
        graphdef, own = models.split_model(model)
        return cls(graphdef, own if variables is None else variables, model.patch_size, model.dense_halo)

    @classmethod
    def from_weights(cls, config, variables: dict, *, source: tuple | None = None) -> "Stage":
        """The network `config` describes, holding `variables` (a stage's weights as `open_model` reads them).

        source: (model directory, stage number) the weights were read from; they are then checked against
        the network's names and shapes, and a mismatch is one line naming the weights file.
        """
        # Only the structure is needed, the weights are given: eval_shape traces the network's
        # initialisers without compiling or running them (0.65 s of a CLI call's start-up otherwise).
        model = nnx.eval_shape(
            lambda: models.build_network(config.model, len(config.data.modalities), 0, config.compute_dtype))
        if source is not None:
            weights.check_against(*source, variables, models.split_model(model)[1])
        return cls.from_network(model, jax.device_put(variables))

    @classmethod
    def load(cls, model_dir, stage: int, config=None) -> "Stage":
        """Stage 1 or 2 of a model directory (its config is read unless given)."""
        config = config if config is not None else model_dir_lib.read_model_config(model_dir)
        return cls.from_weights(config, weights.load(model_dir, stage), source=(model_dir, stage))
