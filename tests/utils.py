"""Small real models and data shared by the tests."""

import keras
import numpy as np
import pytest

# JAX compiles each op anew for every new shape, also when a step runs op by
# op: tests that draw many random shapes take minutes there and seconds on
# the other backends. On JAX they run with the `slow` tests (`-m slow`):
# a module's `pytestmark = SLOW_ON_JAX`.
SLOW_ON_JAX = [pytest.mark.slow] if keras.backend.backend() == "jax" else []


def tiny_cnn(seed=0):
    """Conv2D + BN + DepthwiseConv2D + BN + Conv2D 1x1 + GAP + Dense, seeded."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(16, 1, use_bias=False),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def small_cnn(seed=0):
    """`tiny_cnn` whose first conv has three nearly dead filters, compiled."""
    model = tiny_cnn(seed)
    kernel = model.layers[0].kernel
    weak = keras.ops.convert_to_numpy(kernel).copy()
    weak[..., :3] *= 1e-3  # three inferior filters
    kernel.assign(weak)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def toy_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


def kernels(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]



class LayerStack(keras.Model):
    """Layers in traversal order, each built for its own input shape.

    Reference cases chain layers whose channel counts need not match, so
    the layers are held, not called.
    """

    def __init__(self, layers):
        super().__init__()
        self.stack = layers

    def call(self, x):
        return x


def evolve_after(callback, epoch):
    """Drives `callback` as `fit` does from the end of `epoch` into the next
    epoch, where the evolution after `epoch` runs; returns that next
    epoch's logs, which report it."""
    callback.on_epoch_end(epoch, {})
    callback.on_epoch_begin(epoch + 1)
    logs = {}
    callback.on_epoch_end(epoch + 1, logs)
    return logs


class Interrupt(Exception):
    """What `EndIn` raises, as a crash would."""


class EndIn(keras.callbacks.Callback):
    """Ends `fit` in `epoch`: at its end, or with `mid_epoch` after its
    batch `batch`; by raising `Interrupt`, or with `stop_training=True` by
    setting `model.stop_training` (as EarlyStopping does at an epoch's end
    and TerminateOnNaN after a batch)."""

    def __init__(self, epoch, mid_epoch=False, batch=0, stop_training=False):
        super().__init__()
        self.epoch, self.mid_epoch, self.batch = epoch, mid_epoch, batch
        self.stop_training, self.current = stop_training, None

    def end(self):
        if not self.stop_training:
            raise Interrupt()
        self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.mid_epoch and self.current == self.epoch and batch == self.batch:
            self.end()

    def on_epoch_end(self, epoch, logs=None):
        if not self.mid_epoch and epoch == self.epoch:
            self.end()
