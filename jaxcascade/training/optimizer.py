"""The optimiser: built once, from the config, here and nowhere else.

`OptimizerSettings.from_config(config.train, trainable)` names every number
the optimiser depends on; `make_optimizer(settings)` turns them into an optax
transformation. The train state carries that transformation (see
`train_steps.TrainState`), so the jitted step never rebuilds it. To change the
optimiser (weight decay, a schedule), add a setting to `config.train`, a field
here and its use in `make_optimizer`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from jaxcascade.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Adadelta with the seed's (Lasagne's) settings, optionally restricted to some modules."""

    learning_rate: float = 1.0
    rho: float = 0.95
    epsilon: float = 1e-6
    trainable: tuple[str, ...] = ()  # top-level modules to train; empty: all

    @classmethod
    def from_config(cls, train_config, trainable: tuple[str, ...] = ()) -> "OptimizerSettings":
        return cls(learning_rate=train_config.learning_rate, rho=train_config.rho, epsilon=train_config.epsilon,
                   trainable=tuple(trainable))


# Cached so that equal settings give the very same transformation object: the
# train state carries it as static data, and jit reuses a compiled step only
# for an identical one (both stages, every fit in a process).
@functools.lru_cache(maxsize=None)
def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """The optax transformation; modules outside settings.trainable get zero updates.

    Freezing follows nicMSlesions' fine-tuning of only the last layers.
    """
    adadelta = optax.adadelta(learning_rate=settings.learning_rate, rho=settings.rho, eps=settings.epsilon)
    if not settings.trainable:
        return adadelta

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: "train" if n in settings.trainable else "frozen", subtree)
                for name, subtree in params.items()}

    return optax.multi_transform({"train": adadelta, "frozen": optax.set_to_zero()}, labels)


def trainable_modules(setting: str, params: dict) -> tuple[str, ...]:
    """'all' -> () (everything trains); 'dense1,out' -> those top-level modules, checked."""
    if setting.strip() in ("", "all"):
        return ()
    names = tuple(name.strip() for name in setting.split(",") if name.strip())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise UserError(
            f"--config.train.trainable={setting}: no module {', '.join(unknown)} in this network "
            f"(modules: {', '.join(params)})"
        )
    return names
