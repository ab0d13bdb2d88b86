"""CIFAR networks of the Weight Evolution paper, and `keras.applications`.

`get()` returns an uncompiled `keras.Model` by name. The bundled names
(`names()`) are Keras ports of the networks in the public PyTorch code of

    Zhenquan Lin, Kailing Guo, Xiaofen Xing, Xiangmin Xu.
    Weight Evolution: Improving Deep Neural Networks Training through
    Evolving Inferior Weight Values. ACM Multimedia 2021.

with the same layers, the same number of trainable parameters and the same
weight initialization as that code (biases start at zero here). Any other
name is looked up in `keras.applications` (`"ResNet50"`, `"MobileNetV2"`,
`"EfficientNetB0"`, ...).

Every model returns logits (no softmax), so compile it with e.g.
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.

Conventions shared by the bundled models, chosen to match PyTorch:

- `BatchNormalization(momentum=0.9, epsilon=1e-5)`: PyTorch's
  `BatchNorm2d` defaults (its `momentum=0.1` weighs the new batch). The
  layer is `FusedBatchNormalization`, Keras's `BatchNormalization` trained
  by TensorFlow's or PyTorch's fused kernel on those backends, Keras's own
  on JAX.
- Convolutions are `ChannelsLastConv2D`, Keras's `Conv2D` without the
  PyTorch backend's two layout copies of each input (Keras's own on
  TensorFlow and JAX).
- A strided convolution pads explicitly by `kernel_size // 2` on every
  side and then runs a `"valid"` convolution, like PyTorch's `padding=1`.
  Keras' `padding="same"` would pad only the bottom/right and shift the
  sampling grid by one pixel.
- Weights start as in PyTorch: the ResNets use Kaiming-normal (fan-in,
  untruncated) for convolution and dense kernels; the other networks use
  PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. Biases (which
  PyTorch draws like the weights) and BatchNorm shifts start at zero,
  BatchNorm scales at one.

The models expect `"channels_last"` images. They use only built-in Keras
layers plus four of this package (`ZeroPadShortcut`, `ChannelShuffle`,
`FusedBatchNormalization`, `ChannelsLastConv2D`, defined
in `keras_we.experiments.layers`), which are registered for serialization
when `keras_we` is imported, so a `.keras` file saved on one backend loads on
any backend after `import keras_we`.
"""

import difflib
import numbers

import keras
from keras import initializers
from keras import layers

# Re-exported: they were defined here before `keras_we.experiments.layers`.
from keras_we.experiments.layers import ChannelShuffle, ZeroPadShortcut  # noqa: F401
from keras_we.experiments.layers import ChannelsLastConv2D, FusedBatchNormalization

# PyTorch's `BatchNorm2d(momentum=0.1, eps=1e-5)` in Keras terms.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# keras.applications that refuse small inputs, with their minimum size.
APPLICATION_MIN_SIZES = {
    "InceptionResNetV2": 75,
    "InceptionV3": 75,
    "Xception": 71,
}


def _kaiming_normal():
    """`torch.nn.init.kaiming_normal_` (fan-in, gain sqrt(2), untruncated)."""
    return initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal"
    )


def _torch_default(depthwise=False):
    """PyTorch's default `Conv2d`/`Linear` weight init, U(+-1/sqrt(fan_in)).

    Keras counts the fan-in of a `DepthwiseConv2D` kernel, shaped
    `(k, k, channels, 1)`, as `k * k * channels`; PyTorch counts `k * k`,
    which is what Keras calls the fan-out of that kernel.
    """
    return initializers.VarianceScaling(
        scale=1.0 / 3.0,
        mode="fan_out" if depthwise else "fan_in",
        distribution="uniform",
    )


def _pad_for(x, kernel_size, strides, name):
    """Pads like PyTorch's `padding=kernel_size // 2`; returns the padding
    mode for the convolution that follows."""
    if strides == 1:
        return x, "same"
    x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    return x, "valid"


def _conv_bn(
    x,
    filters,
    kernel_size,
    strides=1,
    groups=1,
    use_bias=False,
    activation="relu",
    kernel_initializer=_torch_default,
    name=None,
):
    """`Conv2D` (PyTorch-style padding) + `BatchNormalization` + activation.

    Args:
        x: Input tensor.
        filters: Number of output channels.
        kernel_size: Integer, square kernel size.
        strides: Integer stride. Defaults to `1`.
        groups: Number of convolution groups. Defaults to `1`.
        use_bias: Whether the convolution has a bias. Defaults to `False`.
        activation: Activation after the normalization, or `None`.
            Defaults to `"relu"`.
        kernel_initializer: Callable returning a fresh initializer.
            Defaults to PyTorch's default initialization.
        name: Prefix of the layer names.

    Returns:
        Output tensor.
    """
    x, padding = _pad_for(x, kernel_size, strides, name)
    x = ChannelsLastConv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer(),
        name=f"{name}_conv",
    )(x)
    x = FusedBatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn"
    )(x)
    if activation:
        x = layers.Activation(activation, name=f"{name}_{activation}")(x)
    return x


def _depthwise_bn(x, strides=1, use_bias=False, activation="relu", name=None):
    """3x3 `DepthwiseConv2D` + `BatchNormalization` + activation.

    Args:
        x: Input tensor.
        strides: Integer stride. Defaults to `1`.
        use_bias: Whether the convolution has a bias. Defaults to `False`.
        activation: Activation after the normalization, or `None`.
            Defaults to `"relu"`.
        name: Prefix of the layer names.

    Returns:
        Output tensor.
    """
    x, padding = _pad_for(x, 3, strides, name)
    x = layers.DepthwiseConv2D(
        3,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        depthwise_initializer=_torch_default(depthwise=True),
        name=f"{name}_dwconv",
    )(x)
    x = FusedBatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_dwbn"
    )(x)
    if activation:
        x = layers.Activation(activation, name=f"{name}_dw{activation}")(x)
    return x


def _classifier(x, classes, kernel_initializer, flatten=False):
    """Global average pooling (or flattening) + `Dense(classes)` logits."""
    if flatten:
        x = layers.Flatten(name="flatten")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return layers.Dense(
        classes, kernel_initializer=kernel_initializer(), name="predictions"
    )(x)


def _resnet_stage(x, filters, blocks, strides, name):
    """A stage of basic residual blocks with option-A shortcuts.

    Each block is conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU.
    The first block applies `strides` and, when the shape changes, a
    `ZeroPadShortcut`; the other blocks use the identity.

    Args:
        x: Input tensor.
        filters: Number of channels of the stage.
        blocks: Number of residual blocks.
        strides: Stride of the first block.
        name: Prefix of the layer names.

    Returns:
        Output tensor.
    """
    for i in range(1, blocks + 1):
        block = f"{name}_block{i}"
        block_strides = strides if i == 1 else 1
        if block_strides != 1 or x.shape[-1] != filters:
            shortcut = ZeroPadShortcut(
                filters, block_strides, name=f"{block}_shortcut"
            )(x)
        else:
            shortcut = x
        y = _conv_bn(
            x,
            filters,
            3,
            strides=block_strides,
            kernel_initializer=_kaiming_normal,
            name=f"{block}_1",
        )
        y = _conv_bn(
            y,
            filters,
            3,
            activation=None,
            kernel_initializer=_kaiming_normal,
            name=f"{block}_2",
        )
        x = layers.Add(name=f"{block}_add")([shortcut, y])
        x = layers.Activation("relu", name=f"{block}_out")(x)
    return x


def cifar_resnet(depth, classes=10, input_shape=(32, 32, 3), name=None):
    """CIFAR ResNet of He et al. (2016), Section 4.2.

    conv3x3(16)-BN-ReLU, then three stages of `(depth - 2) / 6` basic blocks
    with 16, 32 and 64 channels (strides 1, 2, 2), global average pooling
    and `Dense(classes)`. Convolutions have no bias. The shortcuts are
    parameter-free ("option A": stride-2 subsampling and zero channel
    padding, `ZeroPadShortcut`). Convolution and dense kernels use
    Kaiming-normal initialization. Parameters for `classes=10`: 269,722
    (depth 20), 464,154 (32), 658,586 (44), 853,018 (56), 1,727,962 (110).

    Args:
        depth: Integer of the form `6 * n + 2`, e.g. 20, 32, 44, 56, 110.
        classes: Number of classes. Defaults to `10`.
        input_shape: Image shape `(height, width, channels)`.
            Defaults to `(32, 32, 3)`.
        name: Model name. Defaults to `f"resnet{depth}"`.

    Returns:
        An uncompiled `keras.Model` returning logits.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "`depth` must be an integer of the form 6 * n + 2 with n >= 1 "
            f"(e.g. 20, 32, 44, 56, 110). Received: depth={depth}"
        )
    blocks = (depth - 2) // 6
    inputs = layers.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 16, 3, kernel_initializer=_kaiming_normal, name="stem")
    for stage, (filters, strides) in enumerate(
        ((16, 1), (32, 2), (64, 2)), start=1
    ):
        x = _resnet_stage(x, filters, blocks, strides, name=f"stage{stage}")
    outputs = _classifier(x, classes, _kaiming_normal)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


# (filters, strides) of the depthwise-separable blocks of MobileNetV1.
MOBILENET_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def mobilenet_v1(classes=10, input_shape=(32, 32, 3), name="mobilenet_v1"):
    """MobileNetV1 (Howard et al., 2017) with CIFAR strides.

    conv3x3(32, stride 1)-BN-ReLU, then 13 depthwise-separable blocks
    (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU) with the
    `(filters, strides)` of `MOBILENET_V1_BLOCKS` (64, 128/2, 128, 256/2,
    256, 512/2, 5 x 512, 1024/2, 1024), global average pooling and
    `Dense(classes)`. Convolutions have no bias. 3,217,226 parameters for
    `classes=10`.

    Args:
        classes: Number of classes. Defaults to `10`.
        input_shape: Image shape `(height, width, channels)`.
            Defaults to `(32, 32, 3)`.
        name: Model name. Defaults to `"mobilenet_v1"`.

    Returns:
        An uncompiled `keras.Model` returning logits.
    """
    inputs = layers.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 32, 3, name="stem")
    for i, (filters, strides) in enumerate(MOBILENET_V1_BLOCKS, start=1):
        x = _depthwise_bn(x, strides=strides, name=f"block{i}")
        x = _conv_bn(x, filters, 1, name=f"block{i}_pw")
    outputs = _classifier(x, classes, _torch_default)
    return keras.Model(inputs, outputs, name=name)


# (expansion, filters, blocks, strides) of the MobileNetV2 stages.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(classes=10, input_shape=(32, 32, 3), name="mobilenet_v2"):
    """MobileNetV2 (Sandler et al., 2018) with CIFAR strides.

    conv3x3(32, stride 1)-BN-ReLU, then the inverted residual stages of
    `MOBILENET_V2_STAGES` (expansion, filters, blocks, first stride), a
    conv1x1(1280)-BN-ReLU, global average pooling and `Dense(classes)`.
    Each inverted residual block is expand 1x1-BN-ReLU (also when the
    expansion is 1), depthwise 3x3-BN-ReLU, project 1x1-BN. Every
    stride-1 block adds a shortcut: the identity, or conv1x1-BN when the
    channel count changes; stride-2 blocks have none. Activations are ReLU
    (not ReLU6) and convolutions have no bias. 2,296,922 parameters for
    `classes=10`.

    Args:
        classes: Number of classes. Defaults to `10`.
        input_shape: Image shape `(height, width, channels)`.
            Defaults to `(32, 32, 3)`.
        name: Model name. Defaults to `"mobilenet_v2"`.

    Returns:
        An uncompiled `keras.Model` returning logits.
    """
    inputs = layers.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 32, 3, name="stem")
    index = 0
    for expansion, filters, blocks, first_strides in MOBILENET_V2_STAGES:
        for i in range(blocks):
            index += 1
            block = f"block{index}"
            strides = first_strides if i == 0 else 1
            y = _conv_bn(x, expansion * x.shape[-1], 1, name=f"{block}_expand")
            y = _depthwise_bn(y, strides=strides, name=block)
            y = _conv_bn(
                y, filters, 1, activation=None, name=f"{block}_project"
            )
            if strides == 1:
                shortcut = x
                if x.shape[-1] != filters:
                    shortcut = _conv_bn(
                        x,
                        filters,
                        1,
                        activation=None,
                        name=f"{block}_shortcut",
                    )
                y = layers.Add(name=f"{block}_add")([shortcut, y])
            x = y
    x = _conv_bn(x, 1280, 1, name="top")
    outputs = _classifier(x, classes, _torch_default)
    return keras.Model(inputs, outputs, name=name)


def shufflenet_v1(
    classes=10,
    input_shape=(32, 32, 3),
    groups=3,
    stage_filters=(240, 480, 960),
    stage_blocks=(4, 8, 4),
    name="shufflenet_v1",
):
    """ShuffleNet V1 (Zhang et al., 2018) for CIFAR, as in the paper's code.

    conv3x3(24, stride 1)-BN-ReLU, then three stages of ShuffleNet units
    with `stage_filters` channels and `stage_blocks` units (the first unit
    of each stage has stride 2), global average pooling and
    `Dense(classes)`. A unit with `c` output channels is grouped
    conv1x1(c / 4)-BN-ReLU, channel shuffle, depthwise 3x3-BN, grouped
    conv1x1-BN, then ReLU after merging with the shortcut. Stride-1 units
    add the identity; stride-2 units concatenate
    `[3x3 average pool of the input, residual]`, so their last
    convolution outputs `c - input_channels` channels. As in the paper's
    code, every convolution has a bias and every 1x1 convolution is
    grouped, including the first one of the first stage. 925,618
    parameters for `classes=10` and the defaults.

    Args:
        classes: Number of classes. Defaults to `10`.
        input_shape: Image shape `(height, width, channels)`.
            Defaults to `(32, 32, 3)`.
        groups: Number of groups of the 1x1 convolutions. Defaults to `3`.
        stage_filters: Output channels of the three stages.
            Defaults to `(240, 480, 960)`.
        stage_blocks: Number of units of the three stages.
            Defaults to `(4, 8, 4)`.
        name: Model name. Defaults to `"shufflenet_v1"`.

    Returns:
        An uncompiled `keras.Model` returning logits.
    """
    inputs = layers.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 24, 3, use_bias=True, name="stem")
    for stage, (filters, blocks) in enumerate(
        zip(stage_filters, stage_blocks), start=1
    ):
        for i in range(1, blocks + 1):
            unit = f"stage{stage}_unit{i}"
            strides = 2 if i == 1 else 1
            in_channels = x.shape[-1]
            out_channels = filters - in_channels if strides == 2 else filters
            y = _conv_bn(
                x,
                filters // 4,
                1,
                groups=groups,
                use_bias=True,
                name=f"{unit}_reduce",
            )
            y = ChannelShuffle(groups, name=f"{unit}_shuffle")(y)
            y = _depthwise_bn(
                y, strides=strides, use_bias=True, activation=None, name=unit
            )
            y = _conv_bn(
                y,
                out_channels,
                1,
                groups=groups,
                use_bias=True,
                activation=None,
                name=f"{unit}_expand",
            )
            if strides == 2:
                # PyTorch's AvgPool2d(3, 2, padding=1) averages over the
                # zero padding too, hence explicit padding.
                shortcut = layers.ZeroPadding2D(1, name=f"{unit}_pool_pad")(x)
                shortcut = layers.AveragePooling2D(
                    3, strides=2, name=f"{unit}_pool"
                )(shortcut)
                x = layers.Concatenate(name=f"{unit}_concat")([shortcut, y])
            else:
                x = layers.Add(name=f"{unit}_add")([x, y])
            x = layers.Activation("relu", name=f"{unit}_out")(x)
    outputs = _classifier(x, classes, _torch_default)
    return keras.Model(inputs, outputs, name=name)


# Convolution widths of the VGG variants; "M" is a 2x2 max pooling.
VGG_CONFIGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
    + (512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
    + (512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def cifar_vgg(config, classes=10, input_shape=(32, 32, 3), name=None):
    """VGG (Simonyan & Zisserman, 2015) with BatchNorm, for CIFAR.

    conv3x3 (with bias)-BN-ReLU layers and 2x2 max poolings as listed in
    `VGG_CONFIGS[config]`, then `Flatten` and `Dense(classes)`. A 32x32
    input leaves a 1x1x512 feature map, so the classifier is
    `Dense(512 -> classes)`. Parameters for `classes=10`: 14,728,266
    (vgg16) and 20,040,522 (vgg19).

    Args:
        config: `"vgg16"` or `"vgg19"`.
        classes: Number of classes. Defaults to `10`.
        input_shape: Image shape `(height, width, channels)`, at least
            32x32. Defaults to `(32, 32, 3)`.
        name: Model name. Defaults to `config`.

    Returns:
        An uncompiled `keras.Model` returning logits.
    """
    if config not in VGG_CONFIGS:
        raise ValueError(
            f"Unknown VGG config: config={config!r}. "
            f"Expected one of {sorted(VGG_CONFIGS)}."
        )
    inputs = layers.Input(shape=input_shape, name="image")
    x = inputs
    block, conv = 1, 0
    for width in VGG_CONFIGS[config]:
        if width == "M":
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            block, conv = block + 1, 0
        else:
            conv += 1
            x = _conv_bn(
                x, width, 3, use_bias=True, name=f"block{block}_{conv}"
            )
    outputs = _classifier(x, classes, _torch_default, flatten=True)
    return keras.Model(inputs, outputs, name=name or config)


def _bundled(builder, **kwargs):
    def build(classes, input_shape, name):
        return builder(
            classes=classes, input_shape=input_shape, name=name, **kwargs
        )

    return build


# name -> (builder(classes, input_shape, name), minimum image size)
_BUNDLED = {
    "mobilenet_v1": (_bundled(mobilenet_v1), 1),
    "mobilenet_v2": (_bundled(mobilenet_v2), 1),
    "resnet20": (_bundled(cifar_resnet, depth=20), 1),
    "resnet32": (_bundled(cifar_resnet, depth=32), 1),
    "resnet44": (_bundled(cifar_resnet, depth=44), 1),
    "resnet56": (_bundled(cifar_resnet, depth=56), 1),
    "resnet110": (_bundled(cifar_resnet, depth=110), 1),
    "shufflenet_v1": (_bundled(shufflenet_v1), 1),
    "vgg16": (_bundled(cifar_vgg, config="vgg16"), 32),
    "vgg19": (_bundled(cifar_vgg, config="vgg19"), 32),
}


def names():
    """Returns the sorted names of the bundled CIFAR models."""
    return sorted(_BUNDLED)


def application_names():
    """Returns the sorted names of the `keras.applications` models."""
    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def is_application(name):
    """Whether `name` is the exact name of a `keras.applications` model."""
    return name in application_names()


def get(name, classes=10, input_shape=(32, 32, 3)):
    """Returns a new, uncompiled model by name.

    Bundled models (see `names()` and the builders of this module):

    | name            | architecture                      | parameters |
    |-----------------|-----------------------------------|-----------:|
    | `resnet20`      | CIFAR ResNet, 3 x 3 basic blocks  |    269,722 |
    | `resnet32`      | CIFAR ResNet, 3 x 5 basic blocks  |    464,154 |
    | `resnet44`      | CIFAR ResNet, 3 x 7 basic blocks  |    658,586 |
    | `resnet56`      | CIFAR ResNet, 3 x 9 basic blocks  |    853,018 |
    | `resnet110`     | CIFAR ResNet, 3 x 18 basic blocks |  1,727,962 |
    | `mobilenet_v1`  | MobileNetV1, CIFAR strides        |  3,217,226 |
    | `mobilenet_v2`  | MobileNetV2, CIFAR strides        |  2,296,922 |
    | `shufflenet_v1` | ShuffleNet V1, 3 groups           |    925,618 |
    | `vgg16`         | VGG16 with BatchNorm              | 14,728,266 |
    | `vgg19`         | VGG19 with BatchNorm              | 20,040,522 |

    The counts are trainable parameters for `classes=10`.

    Any other `name` must be the exact name of a `keras.applications`
    model (see `application_names()`), e.g. `"ResNet50"`, `"MobileNetV2"`
    or `"EfficientNetB0"`. It is built with `weights=None,
    include_top=True, classifier_activation=None`, so it returns logits
    like the bundled models. `InceptionV3` and
    `InceptionResNetV2` need inputs of at least 75x75 and `Xception` at
    least 71x71; every other application builds at 32x32 (`NASNetMobile`
    and `NASNetLarge` included), except that Keras refuses to build
    `NASNetMobile` with the torch backend.

    Args:
        name: Model name, a bundled name or a `keras.applications` name.
        classes: Integer >= 2, number of classes. Defaults to `10`.
        input_shape: Tuple of 3 positive integers,
            `(height, width, channels)`. Defaults to `(32, 32, 3)`.

    Returns:
        An uncompiled `keras.Model` that maps images to `classes` logits.

    Raises:
        ValueError: for an unknown `name`, an invalid `classes` or
            `input_shape`, an input smaller than the model accepts, or a
            `"channels_first"` image data format.

    Example:

    ```python
    model = keras_we.experiments.models.get("resnet20")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    ```
    """
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a string. Received: name={name!r}")
    if not _is_int(classes) or classes < 2:
        raise ValueError(
            f"`classes` must be an integer >= 2. Received: classes={classes!r}"
        )
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or not all(_is_int(dim) and dim > 0 for dim in input_shape)
    ):
        raise ValueError(
            "`input_shape` must be a tuple of 3 positive integers "
            "(height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )
    classes = int(classes)
    input_shape = tuple(int(dim) for dim in input_shape)
    if keras.config.image_data_format() != "channels_last":
        raise ValueError(
            "keras_we.experiments.models builds channels-last models only. Received: "
            f"keras.config.image_data_format()="
            f"{keras.config.image_data_format()!r}"
        )

    if name in _BUNDLED:
        builder, min_size = _BUNDLED[name]
        _check_min_size(name, min_size, input_shape)
        return builder(classes, input_shape, name)

    applications = application_names()
    if name in applications:
        _check_min_size(
            f"keras.applications.{name}",
            APPLICATION_MIN_SIZES.get(name, 1),
            input_shape,
        )
        try:
            return getattr(keras.applications, name)(
                include_top=True,
                weights=None,
                input_shape=input_shape,
                classes=classes,
                classifier_activation=None,
            )
        except ValueError as e:
            raise ValueError(
                f"keras.applications.{name}(input_shape={input_shape}, "
                f"classes={classes}) failed: {e}"
            ) from e

    message = (
        f"Unknown model: name={name!r}. Expected one of the bundled "
        f"models {names()} or the exact name of a keras.applications "
        "model (e.g. 'ResNet50', 'MobileNetV2', 'EfficientNetB0'; see "
        "keras_we.experiments.models.application_names())."
    )
    close = difflib.get_close_matches(
        name.lower(), [n.lower() for n in names() + applications], n=1
    )
    if close:
        match = next(n for n in names() + applications if n.lower() == close[0])
        message += f" Did you mean {match!r}?"
    raise ValueError(message)


def _check_min_size(model, min_size, input_shape):
    height, width, _ = input_shape
    if height < min_size or width < min_size:
        raise ValueError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels. "
            f"Received: input_shape={input_shape}"
        )


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
