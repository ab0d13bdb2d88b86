"""The custom layers of the CIFAR model zoo (`keras_we.experiments.models`).

They live in this small module, which imports only Keras, so that
`import keras_we` can register them for serialization without importing the
zoo: a `.keras` file holding them (e.g. a run's `model.keras`) then loads
with `keras.saving.load_model` after a plain `import keras_we`.

The registered names, `keras_we>ZeroPadShortcut` and `keras_we>ChannelShuffle`,
are the ones files saved by earlier versions (where the layers were defined
in `keras_we.models`) hold; Keras finds a registered class by that name, not
by the module recorded in the file, so those files load too.
"""

import keras
from keras import layers
from keras import ops


@keras.saving.register_keras_serializable(package="keras_we")
class ZeroPadShortcut(layers.Layer):
    """Parameter-free "option A" shortcut of the CIFAR ResNets.

    Subsamples the spatial grid with a step of `strides`
    (`x[:, ::strides, ::strides, :]`) and zero-pads the channel axis
    to `filters`, splitting the padding evenly between the front and the
    back (the front gets the smaller half when it is odd).

    Args:
        filters: Integer, number of output channels. Must not be smaller
            than the number of input channels.
        strides: Integer, spatial subsampling step. Defaults to `2`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, ceil(height / strides), ceil(width / strides),
        filters)`.
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(
                "`filters` must be a positive integer. "
                f"Received: filters={filters}"
            )
        if not isinstance(strides, int) or strides < 1:
            raise ValueError(
                "`strides` must be a positive integer. "
                f"Received: strides={strides}"
            )
        self.filters = filters
        self.strides = strides

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and channels > self.filters:
            raise ValueError(
                f"ZeroPadShortcut cannot reduce {channels} input channels "
                f"to filters={self.filters}."
            )

    def call(self, inputs):
        channels = inputs.shape[-1]
        outputs = inputs[:, :: self.strides, :: self.strides, :]
        front = (self.filters - channels) // 2
        back = self.filters - channels - front
        if front or back:
            outputs = ops.pad(outputs, [[0, 0], [0, 0], [0, 0], [front, back]])
        return outputs

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def subsample(size):
            return None if size is None else -(-size // self.strides)

        return (batch, subsample(height), subsample(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "strides": self.strides})
        return config


@keras.saving.register_keras_serializable(package="keras_we")
class ChannelShuffle(layers.Layer):
    """Channel shuffle of ShuffleNet (Zhang et al., 2018).

    Views the channels as a `(groups, channels // groups)` grid, transposes
    it and flattens it back, so that the next grouped convolution sees
    channels from every group: channel `g * n + i` moves to `i * groups + g`.

    Args:
        groups: Integer, number of groups. Must divide the number of
            input channels.
        **kwargs: Base layer keyword arguments, such as `name`.

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        Same as the input shape.
    """

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(
                "`groups` must be a positive integer. "
                f"Received: groups={groups}"
            )
        self.groups = groups

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(
                "ChannelShuffle needs a known number of channels divisible "
                f"by groups={self.groups}. Received: input_shape={input_shape}"
            )

    def call(self, inputs):
        _, height, width, channels = ops.shape(inputs)
        per_group = inputs.shape[-1] // self.groups
        outputs = ops.reshape(
            inputs, (-1, height, width, self.groups, per_group)
        )
        outputs = ops.transpose(outputs, (0, 1, 2, 4, 3))
        return ops.reshape(outputs, (-1, height, width, channels))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"groups": self.groups})
        return config
