"""`Stage`: one trained patch classifier, as the inference methods take it.

Its own module, below the cascade and the inference methods that both use it,
so neither has to import the other to name it.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxcascade.networks import models
from jaxcascade.runtime import distributed
from jaxcascade.storage import weights


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained patch classifier; dense_halo is None where it has no exact dense form. Its variables are
    on this process's devices (`from_network`, `load`, `Cascade.from_model` put them there once), so that
    no classification copies them again."""

    graphdef: object
    variables: dict
    patch_size: int
    dense_halo: int | None = None

    @classmethod
    def from_network(cls, model: nnx.Module, variables: dict | None = None) -> "Stage":
        """A stage of a network in memory, with its own variables or the given ones (same structure)."""
        graphdef, own = models.split_model(model)
        variables = own if variables is None else variables
        # An abstract network (`nnx.eval_shape`: shapes, no values) has nothing to place.
        if not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(variables)):
            variables = distributed.put_local_replicated(variables)
        return cls(graphdef, variables, model.patch_size, model.dense_halo)

    @classmethod
    def from_weights(cls, config, variables: dict, *, network: nnx.Module | None = None) -> "Stage":
        """The network `config` describes, holding `variables` as given (a stage's weights as `open_model`
        read and checked them, already on the devices where `Cascade.from_model` builds the stage).

        network: `models.abstract_network(config)` if already built (both stages of a cascade share it);
        only its structure is used, the weights are given.
        """
        network = network if network is not None else models.abstract_network(config)
        return cls(models.split_model(network)[0], variables, network.patch_size, network.dense_halo)

    @classmethod
    def load(cls, model_dir, stage: int, config) -> "Stage":
        """Stage 1 or 2 of a model directory whose config is `config` (checked against its network)."""
        variables = weights.load(model_dir, stage, models.variables_template(config))
        return cls.from_weights(config, distributed.put_local_replicated(variables))
