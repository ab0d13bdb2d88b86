"""Models a user brings: without conv kernels, partly frozen, LoRA, unbuilt."""

import keras
import numpy as np
import pytest

import keras_we
from keras_we.layers import find_targets
from tests.utils import LayerStack, kernels, small_cnn, toy_data


def numpy(variable):
    return keras.ops.convert_to_numpy(variable).copy()


def target_names(model):
    """`layer/variable` of each variable WE works on."""
    return ["/".join(t.path.split("/")[-2:]) for t in find_targets(model)]


def fit(model, callbacks, epochs=3, lr=0.01):
    keras.utils.set_random_seed(1)
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = toy_data()
    return model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks)


# ---------------------------------------------------------------- no conv kernel


def dense_only(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(8),
         keras.layers.BatchNormalization(), keras.layers.Dense(3)])


def transpose_only(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2DTranspose(4, 3), keras.layers.BatchNormalization(),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


@pytest.mark.parametrize("build", [dense_only, transpose_only], ids=["dense", "conv_transpose"])
def test_model_without_conv_kernel_trains_unchanged(build):
    """The warning, then the same training as without the callback."""
    plain = build()
    fit(plain, [])
    with_we = build()
    with pytest.warns(UserWarning, match="no trainable conv kernels"):
        history = fit(with_we, [keras_we.WeightEvolution()])
    assert history.history["we_conv_evolved"] == [0, 0, 0]
    assert history.history["we_changed_elements"] == [0, 0, 0]
    for a, b in zip(kernels(plain), kernels(with_we)):
        np.testing.assert_array_equal(a, b)

    model = build()
    before = kernels(model)
    with pytest.warns(UserWarning, match="no trainable conv kernels"):
        report, state = keras_we.evolve(model, 0)
    assert (report.conv_evolved, report.gamma_evolved, report.beta_evolved) == (0, 0, 0)
    assert report.changed_elements == 0 and report.skipped == []
    assert state == {"conv_counter": 0, "gamma_counter": 0, "beta_counter": 0}
    for a, b in zip(before, kernels(model)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- frozen weights


def two_blocks(seed=0):
    """Conv + BN (the "backbone"), then Conv + BN + head; filters made weak
    in both convs so that each would evolve."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="backbone_conv"),
            keras.layers.BatchNormalization(name="backbone_bn"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="head_conv"),
            keras.layers.BatchNormalization(name="head_bn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    for name in ("backbone_conv", "head_conv"):
        kernel = model.get_layer(name).kernel
        weak = numpy(kernel)
        weak[..., :2] *= 1e-3
        kernel.assign(weak)
    for name in ("backbone_bn", "head_bn"):
        bn = model.get_layer(name)
        rng = np.random.default_rng(3)
        bn.gamma.assign(rng.uniform(0.01, 2.0, 8).astype("float32"))
        bn.beta.assign(rng.uniform(-1.0, 1.0, 8).astype("float32"))
    return model


def frozen_variables(model):
    backbone = [model.get_layer("backbone_conv"), model.get_layer("backbone_bn")]
    return [v for layer in backbone for v in layer.weights
            if v.path.split("/")[-1] in ("kernel", "gamma", "beta")]


def test_frozen_backbone_is_neither_ranked_nor_rewritten():
    model = two_blocks()
    for name in ("backbone_conv", "backbone_bn"):
        model.get_layer(name).trainable = False
    frozen = {v.path: numpy(v) for v in frozen_variables(model)}
    assert sorted(p.split("/")[-1] for p in frozen) == ["beta", "gamma", "kernel"]
    assert [target_names(model)] == [
        ["head_conv/kernel", "head_bn/gamma", "head_bn/beta"]]

    # "Not in the network at all": the same step as on the trainable layers alone.
    alone_copy = two_blocks()
    alone_layers = [alone_copy.get_layer("head_conv"), alone_copy.get_layer("head_bn")]
    alone = LayerStack(alone_layers)
    alone.build((None, 8, 8, 3))
    state, state_alone, evolved = None, None, np.zeros(3, int)
    ratios = dict(conv_ratio=0.5, gamma_ratio=0.5, beta_ratio=0.5)
    for epoch in range(3):
        report, state = keras_we.evolve(model, epoch, state, **ratios)
        expected, state_alone = keras_we.evolve(alone, epoch, state_alone, **ratios)
        counts = (report.conv_evolved, report.gamma_evolved, report.beta_evolved)
        assert counts == (expected.conv_evolved, expected.gamma_evolved, expected.beta_evolved)
        assert report.changed_elements == expected.changed_elements
        evolved += counts
    assert state == state_alone
    assert (evolved >= 1).all(), evolved
    for a, b in zip(alone_layers, [model.get_layer("head_conv"), model.get_layer("head_bn")]):
        for va, vb in zip(a.trainable_weights, b.trainable_weights):
            np.testing.assert_array_equal(numpy(va), numpy(vb))
    for v in frozen_variables(model):
        np.testing.assert_array_equal(numpy(v), frozen[v.path])


def test_frozen_backbone_through_fit_then_unfrozen():
    """Fine-tuning: frozen for a fit, then unfrozen; WE follows."""
    model = two_blocks()
    backbone = [model.get_layer("backbone_conv"), model.get_layer("backbone_bn")]
    for layer in backbone:
        layer.trainable = False
    frozen = {v.path: numpy(v) for v in frozen_variables(model)}
    callback = keras_we.WeightEvolution(conv_ratio=0.5)
    history = fit(model, [callback], epochs=3)
    assert history.history["we_conv_evolved"][1] >= 1
    # Only head_conv's 8 filters are ranked: at most half of them evolve.
    assert max(history.history["we_conv_evolved"]) <= 4
    for v in frozen_variables(model):
        np.testing.assert_array_equal(numpy(v), frozen[v.path])

    for layer in backbone:
        layer.trainable = True
    before = numpy(model.get_layer("backbone_conv").kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = toy_data()
    # A continued fit: the evolution after epoch 2 runs as epoch 3 begins.
    model.fit(x, y, initial_epoch=3, epochs=5, batch_size=16, verbose=0, callbacks=[callback])
    after = numpy(model.get_layer("backbone_conv").kernel)
    assert (before[..., :2] != after[..., :2]).any()  # its weak filters now evolve


def test_variable_created_not_trainable_is_left_alone():
    model = small_cnn()
    kernel = model.layers[0].kernel
    kernel.trainable = False
    before = numpy(kernel)
    keras_we.evolve(model, 5)
    np.testing.assert_array_equal(numpy(kernel), before)
    assert kernel.path not in [t.path for t in find_targets(model)]
    kernel.trainable = True
    report, _ = keras_we.evolve(model, 5)
    assert (numpy(kernel) != before).any()  # its three weak filters, once it trains


def test_lora_base_kernel_is_frozen():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, use_bias=False, name="lora_conv"),
        keras.layers.Conv2D(8, 3, use_bias=False, name="plain_conv"),
    ])
    for layer in model.layers:
        weak = numpy(layer.kernel)
        weak[..., :2] *= 1e-3
        layer.kernel.assign(weak)
    lora = model.get_layer("lora_conv")
    base_before = numpy(lora._kernel)
    lora.enable_lora(2)
    assert not lora._kernel.trainable
    assert target_names(model) == ["plain_conv/kernel"]
    report, _ = keras_we.evolve(model, 10, conv_ratio=0.5)
    np.testing.assert_array_equal(numpy(lora._kernel), base_before)
    assert 1 <= report.conv_evolved <= 4  # of plain_conv's 8 filters only


# ---------------------------------------------------------------- unbuilt models


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.head(self.pool(self.bn(self.conv(x), training=training)))


def unbuilt_sequential():
    return keras.Sequential([
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


@pytest.mark.parametrize("build", [unbuilt_sequential, Subclassed], ids=["sequential", "subclassed"])
def test_unbuilt_model_evolves_once_built(build):
    keras.utils.set_random_seed(0)
    model = build()
    assert not model.built
    history = fit(model, [keras_we.WeightEvolution(conv_ratio=0.5)], epochs=3)
    assert history.history["we_conv_evolved"][0] == 0
    assert history.history["we_conv_evolved"][1] >= 1
    assert all(np.isfinite(w).all() for w in kernels(model))


def test_evolve_on_unbuilt_model_says_how_to_build_it():
    with pytest.raises(ValueError, match="not built"):
        keras_we.evolve(unbuilt_sequential(), 0)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("model", [None, "model", np.ones((3, 3))])
def test_evolve_names_a_bad_model(model):
    with pytest.raises(TypeError, match="`model` must be a built keras.Model"):
        keras_we.evolve(model, 0)


def test_schedule_out_of_range_fails_before_training():
    model = small_cnn()
    before = kernels(model)
    callback = keras_we.WeightEvolution(schedule=lambda epoch: 50.0 if epoch == 2 else 1.0)
    x, y = toy_data()
    with pytest.raises(ValueError, match=r"conv_ratio \* schedule\(2\).*\[0, 1\]") as info:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[callback])
    assert "10.0" in str(info.value)
    for a, b in zip(before, kernels(model)):  # nothing trained
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"schedule\(0\)"):
        keras_we.evolve(model, 0, schedule=lambda epoch: 50.0)
    # A multiplier above 1 is fine while the ratios stay within [0, 1].
    report, _ = keras_we.evolve(model, 0, schedule=lambda epoch: 5.0)
    assert report.conv_ratio == pytest.approx(1.0) and report.gamma_ratio == pytest.approx(0.25)
