"""The paper's CIFAR training recipe: optimizer, learning-rate steps, WE schedule.

The public code trains with PyTorch's `SGD(lr=0.1, momentum=0.9,
weight_decay=5e-4)` and `MultiStepLR(milestones=[60, 120, 180], gamma=0.1)`
for 200 epochs, evolving after every epoch. `PaperSGD` reproduces PyTorch's
update rule, which differs from `keras.optimizers.SGD` twice: weight decay is
an L2 term added to the gradient of every parameter (BatchNorm included)
before momentum, and the learning rate multiplies the momentum buffer
instead of being folded into it, so a learning-rate drop acts at once.
"""

import dataclasses

import keras
from keras import ops

from keras_we.schedule import PaperSchedule
from keras_we.validation import check_int, check_real


@keras.saving.register_keras_serializable(package="keras_we")
class PaperSGD(keras.optimizers.Optimizer):
    """SGD with PyTorch semantics: `buf = m*buf + (g + wd*w)`, `w -= lr*buf`.

    Args:
        learning_rate: float or schedule. Defaults to 0.1.
        momentum: in [0, 1). Defaults to 0.9 (no Nesterov, as the public
            WE script).
        l2: coupled weight decay added to every gradient. Defaults to 5e-4.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, l2=5e-4, name="paper_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = check_real("momentum", momentum, minimum=0, maximum=1)
        self.l2 = check_real("l2", l2, minimum=0)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [
            self.add_variable_from_reference(v, name="momentum") for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        gradient = gradient + self.l2 * variable
        buffer = self.momentums[self._get_variable_index(variable)]
        new_buffer = self.momentum * buffer + gradient
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, learning_rate * new_buffer)

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "l2": self.l2})
        return config


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The paper's protocol, scaled to `epochs`.

    Milestones of the learning rate (60, 120, 180 of 200) and of the WE
    schedule (60, 120 of 200, temperature 15) scale with `epochs / 200`.
    """

    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple = (60, 120, 180)
    lr_factor: float = 0.1
    reference_epochs: int = 200

    def __post_init__(self):
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_real("learning_rate", self.learning_rate, minimum=0, open_minimum=True)

    def optimizer(self):
        return PaperSGD(self.learning_rate, momentum=self.momentum, l2=self.weight_decay)

    def scaled_lr_milestones(self):
        scale = self.epochs / self.reference_epochs
        return tuple(round(m * scale) for m in self.lr_milestones)

    def learning_rate_at(self, epoch):
        drops = sum(1 for m in self.scaled_lr_milestones() if m <= epoch)
        return self.learning_rate * self.lr_factor**drops

    def we_schedule(self):
        return PaperSchedule().scaled(self.epochs)

    def callbacks(self):
        """The learning-rate steps, as a Keras callback."""
        return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: self.learning_rate_at(epoch))]
