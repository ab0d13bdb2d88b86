"""Weight Evolution for Keras 3 (Lin et al., ACM Multimedia 2021)."""

from keras_we import data, models
from keras_we.export import export_for_serving
from keras_we.evolution import EvolutionReport, evolve
from keras_we.schedule import PaperSchedule
from keras_we.weight_evolution import WeightEvolution

__version__ = "0.1.0"

__all__ = [
    "WeightEvolution",
    "PaperSchedule",
    "evolve",
    "EvolutionReport",
    "export_for_serving",
    "data",
    "models",
]
