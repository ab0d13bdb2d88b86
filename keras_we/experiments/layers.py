"""The custom layers of the CIFAR model zoo (`keras_we.experiments.models`).

They live in this small module, which imports only Keras, so that
`import keras_we` can register them for serialization without importing the
zoo: a `.keras` file holding them (e.g. a run's `model.keras`) then loads
with `keras.saving.load_model` after a plain `import keras_we`.

`FusedBatchNormalization` and `ChannelsLastConv2D` are Keras's
`BatchNormalization` and `Conv2D` with faster paths on some backends
(registered as `keras_we>FusedBatchNormalization`, `keras_we>ChannelsLastConv2D`).

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


@keras.saving.register_keras_serializable(package="keras_we")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's `BatchNormalization`, trained by the backend's fused kernel.

    Same arguments, variables, config and results as
    `keras.layers.BatchNormalization` (it is one: `isinstance` holds, so Weight
    Evolution and its peers find its gamma and beta). Only the way a
    training call is computed differs, and only where the backend has a
    faster way: on TensorFlow and PyTorch, a training call on a 4D
    channels-last float input, with `center`, `scale`, no mask, no renorm and
    `synchronized=False`, normalizes with TensorFlow's `FusedBatchNormV3` or
    PyTorch's `torch.nn.functional.batch_norm` (one kernel forward, one
    backward) instead of Keras's `moments` and `batch_normalization` (about
    ten elementwise and reduction kernels, and their gradients). The moving
    statistics move exactly as in Keras, with the biased batch variance.
    Every other call (inference, JAX, other inputs) is Keras's own.

    Why: Keras 3 has no fused batch norm (Keras 2 had `fused=True`). On 2
    CPU cores, TensorFlow's profiler put 30% of a CIFAR ResNet-20 training
    step's op time in the unfused one; with this layer the runner trains
    671 images/s instead of 487 on TensorFlow, and 0.87 of a plain PyTorch
    loop's images/s instead of 0.69 on PyTorch (`benchmarks/throughput.py`).
    On JAX, XLA fuses Keras's version itself.

    The fused kernels compute in float32 (float16 and bfloat16 inputs are
    upcast, as Keras does); float64 inputs take Keras's path. Results agree
    with Keras's to float32 rounding, not bit for bit.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, "float32")
        fused = _FUSED[keras.backend.backend()]
        outputs, mean, variance = fused(
            x, ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32"), self.epsilon)
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        self.moving_mean.assign(
            ops.cast(self.moving_mean, "float32") * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, "float32") * self.momentum
            + variance * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask):
        return (keras.backend.backend() in _FUSED and mask is None
                and self._reduction_axes == [0, 1, 2]
                and self.center and self.scale and not self.renorm
                and not self.synchronized
                and keras.backend.standardize_dtype(inputs.dtype)
                in ("float16", "bfloat16", "float32"))


def _biased(unbiased_variance, x):
    """The biased batch variance from the unbiased one, over all of `x`'s
    positions but the channel."""
    count = ops.cast(ops.size(x) // ops.shape(x)[-1], "float32")
    return unbiased_variance * (count - 1.0) / ops.maximum(count, 1.0)


def _tensorflow_batch_norm(x, gamma, beta, epsilon):
    """`(outputs, batch mean, biased batch variance)` of a channels-last 4D
    float32 `x`, by TensorFlow's `FusedBatchNormV3`."""
    import tensorflow as tf

    empty = tf.constant([], dtype="float32")
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=epsilon, data_format="NHWC", is_training=True,
    )
    return outputs, mean, _biased(variance, x)


def _torch_batch_norm(x, gamma, beta, epsilon):
    """The same by PyTorch's `batch_norm`, on `x` seen as NCHW (a
    channels-last view, which its kernel takes as is)."""
    import torch

    channels = x.shape[-1]
    # With momentum 1, the running buffers become the batch mean and the
    # unbiased batch variance.
    mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
    variance = torch.zeros(channels, dtype=x.dtype, device=x.device)
    outputs = torch.nn.functional.batch_norm(
        x.permute(0, 3, 1, 2), mean, variance, gamma, beta,
        training=True, momentum=1.0, eps=epsilon,
    )
    return outputs.permute(0, 2, 3, 1), mean, _biased(variance, x)


# The backends whose own fused kernel trains faster than Keras's path.
_FUSED = {"tensorflow": _tensorflow_batch_norm, "torch": _torch_batch_norm}


@keras.saving.register_keras_serializable(package="keras_we")
class ChannelsLastConv2D(layers.Conv2D):
    """Keras's `Conv2D`, without the PyTorch backend's layout copies.

    Same arguments, variables, config and results as `keras.layers.Conv2D`
    (it is one: `isinstance` holds, so Weight Evolution and its peers find
    its kernel). Only on the PyTorch backend, for channels-last inputs with
    `"valid"` padding, or `"same"` padding with odd kernel sizes and stride
    1, and no dilation, the convolution runs `torch.nn.functional.conv2d` on
    the input seen as NCHW through a `permute`: a channels-last view, which
    PyTorch's kernels take as they are. Keras 3.15.1's torch `conv` first
    copies each input into contiguous NCHW memory and then back into
    channels-last memory for the kernel, 14% of a CIFAR ResNet-20 training
    step's CPU time on 2 cores (`torch.profiler`); without those copies a
    step took 231 ms instead of 264. Every other case is Keras's own.
    """

    def convolution_op(self, inputs, kernel):
        if not self._direct(inputs):
            return super().convolution_op(inputs, kernel)
        import torch

        padding = 0 if self.padding == "valid" else tuple(k // 2 for k in self.kernel_size)
        outputs = torch.nn.functional.conv2d(
            inputs.permute(0, 3, 1, 2), ops.convert_to_tensor(kernel).permute(3, 2, 0, 1),
            stride=self.strides, padding=padding, groups=self.groups,
        )
        return outputs.permute(0, 2, 3, 1)

    def _direct(self, inputs):
        same = self.padding == "same" and all(k % 2 for k in self.kernel_size) and (
            tuple(self.strides) == (1, 1))
        return (keras.backend.backend() == "torch" and self.data_format == "channels_last"
                and len(inputs.shape) == 4 and tuple(self.dilation_rate) == (1, 1)
                and (self.padding == "valid" or same))
