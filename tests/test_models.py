"""Tests of keras_we.experiments.models: parameter counts, forward passes, the four
custom layers, `.keras` round trips and argument errors."""

import os

import keras
import numpy as np
import pytest

from keras_we.experiments import models

# Trainable parameters for classes=10, as in the paper's PyTorch code.
PARAMS = {
    "mobilenet_v1": 3_217_226,
    "mobilenet_v2": 2_296_922,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "shufflenet_v1": 925_618,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
}


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def build_without_values(name, **kwargs):
    """Builds a model with uninitialized variables (shapes only), which
    skips JAX's compilation of an initializer for every weight shape."""
    with keras.StatelessScope(initialize_variables=False):
        model = models.get(name, **kwargs)
    # Forget the uninitialized variables, or the next symbolic call of any
    # layer would initialize them all.
    keras.backend.clear_session(free_memory=False)
    return model


@pytest.fixture(scope="module")
def built():
    """Models with real weights, built once per module (JAX compiles an
    initializer per weight shape and every op on its first eager call)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = models.get(name)
        return cache[name]

    return get


def test_names():
    assert models.names() == sorted(PARAMS)
    assert "ResNet50" in models.application_names()
    assert models.is_application("EfficientNetB0")
    assert not models.is_application("resnet20")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_trainable_parameter_count(name):
    model = build_without_values(name)
    assert trainable_count(model) == PARAMS[name]
    assert model.name == name
    assert model.output.shape == (None, 10)


def test_resnet20_with_100_classes():
    model = build_without_values("resnet20", classes=100)
    assert trainable_count(model) == PARAMS["resnet20"] + 64 * 90 + 90
    # Option-A shortcuts and activations carry no weights.
    shortcuts = [
        layer
        for layer in model.layers
        if isinstance(layer, models.ZeroPadShortcut)
    ]
    assert len(shortcuts) == 2
    assert all(not layer.weights for layer in shortcuts)


def test_pytorch_batchnorm_and_init(built):
    model = built("resnet20")
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 19
    for layer in norms:
        assert type(layer) is models.FusedBatchNormalization
        assert layer.momentum == pytest.approx(0.9)
        assert layer.epsilon == pytest.approx(1e-5)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 19 and all(type(layer) is models.ChannelsLastConv2D for layer in convs)
    # Kaiming normal: std sqrt(2 / fan_in), fan_in = 3 * 3 * 64.
    kernel = keras.ops.convert_to_numpy(
        model.get_layer("stage3_block2_1_conv").kernel
    )
    assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.05)
    conv = model.get_layer("stage2_block1_1_conv")
    assert conv.padding == "valid" and conv.strides == (2, 2)


@pytest.mark.parametrize("name", ["resnet20", "shufflenet_v1"])
def test_forward_pass(name, built):
    model = built(name)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    # Logits, not probabilities.
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_other_input_shape():
    model = build_without_values(
        "mobilenet_v2", classes=5, input_shape=(48, 40, 1)
    )
    assert model.input.shape == (None, 48, 40, 1)
    assert model.output.shape == (None, 5)


@pytest.mark.parametrize("name", ["resnet20", "shufflenet_v1"])
def test_keras_round_trip(name, built, tmp_path):
    model = built(name)
    x = np.random.default_rng(1).random((4, 32, 32, 3), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    path = os.path.join(tmp_path, f"{name}.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.name == name
    assert trainable_count(restored) == PARAMS[name]
    actual = keras.ops.convert_to_numpy(restored(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert {type(layer).__name__ for layer in restored.layers if "bn" in layer.name} == {
        "FusedBatchNormalization"}
    assert {type(layer).__name__ for layer in restored.layers if layer.name.endswith("_conv")} == {
        "ChannelsLastConv2D"}


def test_zero_pad_shortcut():
    x = np.arange(2 * 5 * 6 * 4, dtype="float32").reshape(2, 5, 6, 4)
    layer = models.ZeroPadShortcut(9, strides=2)
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 3, 3, 9) == layer.compute_output_shape(x.shape)
    # 5 channels of padding: 2 in front, 3 behind.
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    assert not y[..., :2].any() and not y[..., 6:].any()
    assert models.ZeroPadShortcut.from_config(layer.get_config()).filters == 9
    with pytest.raises(ValueError, match="filters=2"):
        layer = models.ZeroPadShortcut(2)
        layer(x)


def test_channel_shuffle():
    x = np.arange(2 * 3 * 3 * 6, dtype="float32").reshape(2, 3, 3, 6)
    layer = models.ChannelShuffle(3)
    y = keras.ops.convert_to_numpy(layer(x))
    # Channel g * 2 + i (group g of 3, index i of 2) moves to i * 3 + g.
    np.testing.assert_array_equal(y, x[..., [0, 2, 4, 1, 3, 5]])
    assert models.ChannelShuffle.from_config(layer.get_config()).groups == 3
    with pytest.raises(ValueError, match="groups=4"):
        models.ChannelShuffle(4)(x)


def test_keras_application():
    model = build_without_values("MobileNetV2", classes=7)
    assert model.output.shape == (None, 7)
    assert model.layers[-1].activation is keras.activations.linear


@pytest.mark.parametrize(
    "name, size", [("InceptionV3", 75), ("Xception", 71), ("vgg16", 32)]
)
def test_input_too_small(name, size):
    with pytest.raises(
        ValueError, match=f"{name} needs inputs of at least {size}x{size}"
    ):
        models.get(name, input_shape=(24, 24, 3))


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        models.get("resnet18")
    message = str(info.value)
    assert "'resnet18'" in message
    for name in models.names():
        assert name in message
    assert "keras.applications" in message
    with pytest.raises(ValueError, match="Did you mean 'ResNet50'"):
        models.get("resnet50")


@pytest.mark.parametrize("classes", [1, 0, 2.0, True, "10", None])
def test_bad_classes(classes):
    with pytest.raises(ValueError, match=r"`classes` must be an integer >= 2"):
        models.get("resnet20", classes=classes)


@pytest.mark.parametrize(
    "input_shape", [(32, 32), (32, 32, 3, 1), (32, 0, 3), (32.0, 32, 3), None]
)
def test_bad_input_shape(input_shape):
    with pytest.raises(ValueError, match="`input_shape` must be a tuple of 3"):
        models.get("resnet20", input_shape=input_shape)


def conv_bn_model(norm_class, seed, dtype=None, conv_class=keras.layers.Conv2D,
                  conv_kwargs=None, **norm_kwargs):
    """Conv -> batch norm -> ReLU -> pooled logits, its weights drawn from
    `seed` (so two classes get the same ones), compiled with SGD."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 5, 3))
    x = conv_class(7, dtype=dtype, **(conv_kwargs or {"kernel_size": 3, "padding": "same"}))(inputs)
    x = norm_class(momentum=0.9, epsilon=1e-5, dtype=dtype, name="norm", **norm_kwargs)(x)
    x = keras.layers.ReLU(dtype=dtype)(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    model = keras.Model(inputs, keras.layers.Dense(4, dtype=dtype)(x))
    norm = model.get_layer("norm")
    norm.gamma.assign(np.linspace(0.5, 2.0, 7))
    norm.beta.assign(np.linspace(-1.0, 1.0, 7))
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("mixed_bfloat16", 2e-2)])
def test_fused_batch_norm_trains_like_keras_batch_norm(dtype, atol):
    """Three SGD steps through conv + batch norm: the loss, the conv kernel
    (moved by the gradient the norm passes back), gamma, beta and the moving
    statistics (biased batch variance, as in Keras) agree with Keras's
    `BatchNormalization` to float32 rounding (bfloat16's, under the mixed
    policy), on TensorFlow and PyTorch, where the layer takes their fused
    kernel. On JAX the layer is Keras's own: equal bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 3.0, size=(16, 6, 5, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    runs = []
    for norm_class in (keras.layers.BatchNormalization, models.FusedBatchNormalization):
        model = conv_bn_model(norm_class, seed=5, dtype=dtype)
        losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
        runs.append((losses, [keras.ops.convert_to_numpy(v) for v in model.weights]))
    (keras_losses, keras_weights), (fused_losses, fused_weights) = runs
    moving_variance = keras_weights[5]
    assert moving_variance.shape == (7,) and np.all(moving_variance > 1.0)
    if keras.backend.backend() == "jax":
        assert fused_losses == keras_losses
        for want, got in zip(keras_weights, fused_weights):
            np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_allclose(fused_losses, keras_losses, atol=atol)
    assert keras_losses[0] != keras_losses[2]
    for want, got in zip(keras_weights, fused_weights):
        np.testing.assert_allclose(got, want, atol=atol * max(1.0, float(np.max(np.abs(want)))))


def takes_fused_kernel(layer, shape, dtype="float32", training=True):
    """Whether a call of `layer` on zeros of `shape` runs the backend's fused
    batch norm: TensorFlow's `FusedBatchNormV3` op in the traced call, or
    PyTorch's `torch.nn.functional.batch_norm` called."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        traced = tf.function(lambda x: layer(x, training=training))
        graph = traced.get_concrete_function(tf.TensorSpec(shape, dtype)).graph
        return "FusedBatchNormV3" in {op.type for op in graph.get_operations()}
    import torch

    calls, batch_norm = [], torch.nn.functional.batch_norm
    torch.nn.functional.batch_norm = lambda *a, **k: calls.append(1) or batch_norm(*a, **k)
    try:
        layer(np.zeros(shape, dtype), training=training)
    finally:
        torch.nn.functional.batch_norm = batch_norm
    return bool(calls)


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="JAX has no fused kernel to take (XLA fuses Keras's ops); "
                           "test_fused_batch_norm_trains_like_keras_batch_norm checks the layer is Keras's there")
def test_fused_batch_norm_uses_the_kernel_only_where_it_applies():
    """Training on 4D channels-last float32 (or float16) takes the fused
    kernel; inference, float64, another axis, renorm, a frozen layer and 2D
    inputs take Keras's path."""
    layer = models.FusedBatchNormalization
    assert takes_fused_kernel(layer(), (2, 4, 4, 3))
    assert takes_fused_kernel(layer(dtype="mixed_float16"), (2, 4, 4, 3), dtype="float16")
    assert not takes_fused_kernel(layer(), (2, 4, 4, 3), training=False)
    assert not takes_fused_kernel(layer(dtype="float64"), (2, 4, 4, 3), dtype="float64")
    assert not takes_fused_kernel(layer(axis=1), (2, 3, 4, 4))
    assert not takes_fused_kernel(layer(renorm=True), (2, 4, 4, 3))
    assert not takes_fused_kernel(layer(), (5, 3))
    frozen = layer()
    frozen.trainable = False
    assert not takes_fused_kernel(frozen, (2, 4, 4, 3))


CONV_CASES = [  # (Conv2D arguments, whether PyTorch takes the direct path)
    ({"kernel_size": 3, "padding": "same"}, True),
    ({"kernel_size": 3, "padding": "valid", "strides": 2}, True),
    ({"kernel_size": 1, "padding": "valid"}, True),
    ({"kernel_size": 3, "padding": "same", "strides": 2}, False),  # asymmetric padding
    ({"kernel_size": 2, "padding": "same"}, False),
    ({"kernel_size": 3, "padding": "same", "dilation_rate": 2}, False),
]


@pytest.mark.parametrize("conv_kwargs, direct", CONV_CASES)
def test_channels_last_conv_trains_like_keras_conv(conv_kwargs, direct):
    """Three SGD steps through `ChannelsLastConv2D` + batch norm equal the
    same with Keras's `Conv2D`: to float32 rounding on PyTorch (where the
    direct cases skip Keras's layout copies; measured equal bit for bit),
    bit for bit elsewhere (Keras's own path)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6, 5, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    runs = []
    for conv_class in (keras.layers.Conv2D, models.ChannelsLastConv2D):
        model = conv_bn_model(keras.layers.BatchNormalization, seed=2, conv_class=conv_class,
                              conv_kwargs=conv_kwargs)
        losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
        runs.append((losses, [keras.ops.convert_to_numpy(v) for v in model.weights]))
        conv = model.layers[1]
    assert type(conv) is models.ChannelsLastConv2D
    assert conv._direct(x) == (direct and keras.backend.backend() == "torch")
    (keras_losses, keras_weights), (direct_losses, direct_weights) = runs
    assert keras_losses[0] != keras_losses[2]
    atol = 1e-5 if keras.backend.backend() == "torch" else 0.0
    np.testing.assert_allclose(direct_losses, keras_losses, rtol=0, atol=atol)
    for want, got in zip(keras_weights, direct_weights):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
