"""The few places where Keras backends differ for Weight Evolution."""

import keras
from keras import ops


def stable_argsort(x):
    """`argsort` along the last axis that keeps tied items in index order.

    Forward matching pairs items by rank, so tied scores (dead filters are
    all zero) must rank the same way on every backend. JAX and PyTorch sort
    stably through `keras.ops.argsort`; TensorFlow needs to be asked.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.argsort(x, axis=-1, stable=True)
    return ops.argsort(x, axis=-1)


def compile_function(function, static_argnums=()):
    """Compiles a pure tensor function where the backend allows it.

    JAX uses `jax.jit` and TensorFlow `tf.function`, both of which compile
    once per input shape; arguments at `static_argnums` are Python values
    (TensorFlow treats non-tensor arguments as static by itself). PyTorch
    runs eagerly, since `torch.compile` costs far more than the step it
    would speed up.
    """
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return jax.jit(function, static_argnums=static_argnums)
    if name == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(function)

        def call(*args):
            # One trace per bucket shape is expected; TensorFlow would warn
            # about "retracing" after five of them.
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")
            try:
                return compiled(*args)
            finally:
                logger.setLevel(level)

        return call
    return function


def read_value(variable):
    """The current value of a Keras variable, as a backend tensor.

    On TensorFlow this is an explicit read: a (Mirrored)Variable passed to a
    `tf.function` is captured by its type, so two variables of one shape
    would share a trace, and converting the Keras variable would go through
    NumPy.
    """
    if keras.backend.backend() == "tensorflow":
        return variable.value.read_value()
    return variable.value
