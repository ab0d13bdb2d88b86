"""Weight Evolution for Keras 3 (Lin et al., ACM Multimedia 2021)."""

import importlib

from keras_we import layouts, peers
from keras_we.crossovers import Crossover, register_crossover
from keras_we.evolution import EvolutionReport, evolve
from keras_we.export import export_for_serving
from keras_we.layers import register_layer
from keras_we.schedule import MultiplierSchedule, PaperSchedule, Schedule
from keras_we.weight_evolution import WeightEvolution

# A saved zoo model (e.g. a run's model.keras) holds the zoo's layers
# (ZeroPadShortcut, ChannelShuffle, FusedBatchNormalization,
# ChannelsLastConv2D) and, compiled, the recipe's optimizer
# PaperSGD. Importing their modules registers them, so such a file loads with
# `keras.saving.load_model` after a plain `import keras_we`. Both modules
# import only Keras and keras_we's core (schedule, validation), so this costs
# next to nothing; PaperSGD therefore stays in the recipe it implements
# instead of a module of its own. The zoo (models), the data pipeline, the
# runner and the CLI are not imported.
from keras_we.experiments import layers as _zoo_layers  # noqa: F401
from keras_we.experiments import recipe as _recipe  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "WeightEvolution",
    "Schedule",
    "PaperSchedule",
    "MultiplierSchedule",
    "Crossover",
    "register_crossover",
    "register_layer",
    "layouts",
    "peers",
    "evolve",
    "EvolutionReport",
    "export_for_serving",
]

# Moved to `keras_we.experiments`; still attributes of `keras_we` for code
# written before the move, imported on first access (PEP 562).
_MOVED = {
    "data": "keras_we.experiments.data",
    "models": "keras_we.experiments.models",
    "recipe": "keras_we.experiments.recipe",
}


def __getattr__(name):
    if name in _MOVED:
        module = importlib.import_module(_MOVED[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MOVED))
