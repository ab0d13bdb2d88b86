"""ARCHITECTURE.md's worked examples, run as written: a crossover mode and a
layer type, each added in one place."""

import os
import re

import keras
import numpy as np
import pytest

import keras_we
from keras_we import crossovers, layers
from keras_we.evolution import EvolutionOptions, Evolver
from keras_we.layers import find_targets

ARCHITECTURE = os.path.join(os.path.dirname(__file__), os.pardir, "ARCHITECTURE.md")
CONSTANT = {"schedule": lambda epoch: 1.0}


def example(title):
    """Runs the python block of ARCHITECTURE.md marked `# example: <title>`;
    returns its namespace."""
    with open(ARCHITECTURE) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    (code,) = [b for b in blocks if b.startswith(f"# example: {title}\n")]
    namespace = {}
    exec(compile(code, ARCHITECTURE, "exec"), namespace)
    return namespace


@pytest.fixture
def midpoint():
    example("crossover mode")
    yield crossovers.get("midpoint")
    crossovers.unregister_crossover("midpoint")


@pytest.fixture
def transposed():
    example("layer type")
    yield
    layers.unregister_layer(keras.layers.Conv2DTranspose)


def test_new_crossover_mode(midpoint):
    # One Conv2D(2, 3) on 2 channels. Filter 0 is strong; filter 1 weak
    # (score <= 0.1 * best), so with r = 1 (threshold = the best score) it is
    # the only inferior filter, paired with filter 0. Per channel c, s is
    # filter 1's first smallest-magnitude element, l filter 0's first largest,
    # and every element of filter 1 equal to s becomes (s + l) / 2.
    kernel = np.zeros((3, 3, 2, 2), "float32")
    kernel[..., 0, 0] = [[1, -2, 3], [4, 5, -6], [7, 8, 9]]  # l = 9
    kernel[..., 1, 0] = [[-9, 1, 1], [1, 1, 1], [1, 1, 1]]  # l = -9 (first of |9|)
    kernel[..., 0, 1] = [[0.1, -0.05, 0.2], [0.3, 0.05, 0.1], [0.1, 0.1, 0.1]]  # s = -0.05
    kernel[..., 1, 1] = [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2], [0.2, 0.2, 0.3]]  # s = 0.2, 8 times
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(2, 3, use_bias=False)])
    model.layers[0].kernel.assign(kernel)
    report, _ = keras_we.evolve(model, 0, conv_ratio=1.0, crossover="midpoint", **CONSTANT)
    want = kernel.copy()
    want[0, 1, 0, 1] = (-0.05 + 9) / 2
    want[..., 1, 1] = np.where(kernel[..., 1, 1] == np.float32(0.2), (0.2 - 9) / 2, kernel[..., 1, 1])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[0].kernel), want, rtol=1e-6)
    assert (report.conv_evolved, report.changed_elements) == (1, 9)
    # By name, as an object, in the callback; unknown names still fail.
    assert EvolutionOptions(crossover="midpoint").crossover is midpoint
    assert keras_we.WeightEvolution(crossover=midpoint).options.crossover is midpoint
    with pytest.raises(ValueError, match="'midpoint'"):
        EvolutionOptions(crossover="halfway")


def test_a_modes_nonfinite_values_are_not_written():
    # The same kernel as above, with a formula that says every value is
    # valid but gives NaN where l < 0 and inf where l == 0: those channels
    # keep their old values, the others take the formula's.
    keras_we.register_crossover(keras_we.Crossover(
        "log_of_largest", whole_filter=lambda spatial: False,
        element=lambda s, l: (keras.ops.log(l), keras.ops.ones_like(l, "bool"))))
    try:
        kernel = np.zeros((3, 3, 3, 2), "float32")
        kernel[..., 0, 0] = 9 * np.eye(3)  # l = 9: log 9 is written
        kernel[..., 1, 0] = -9 * np.eye(3)  # l = -9: NaN, not written
        kernel[0, 0, 2, 0] = 5  # channel 2: l = 0 nowhere, l = 5
        kernel[..., 0, 1] = 0.05  # s = 0.05 (all nine)
        kernel[..., 1, 1] = 0.05
        kernel[..., 2, 1] = 0.05
        model = keras.Sequential([keras.Input((5, 5, 3)), keras.layers.Conv2D(2, 3, use_bias=False)])
        model.layers[0].kernel.assign(kernel)
        report, _ = keras_we.evolve(model, 0, conv_ratio=1.0, crossover="log_of_largest", **CONSTANT)
        got = keras.ops.convert_to_numpy(model.layers[0].kernel)
        want = kernel.copy()
        want[..., 0, 1] = np.log(np.float32(9))
        want[..., 2, 1] = np.log(np.float32(5))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert np.isfinite(got).all() and report.changed_elements == 18
    finally:
        crossovers.unregister_crossover("log_of_largest")


def test_new_crossover_mode_is_a_runner_method(midpoint):
    from keras_we.experiments import runner

    assert "we-midpoint" in runner.methods()
    assert runner.method_callbacks("we-midpoint")[0].options.crossover is midpoint


def random_transposed_pair(seed):
    """Conv2DTranspose layers and Conv2D layers holding the same filters."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((5, 5, 3))
    transposed = [keras.layers.Conv2DTranspose(6, 3, use_bias=False),
                  keras.layers.Conv2DTranspose(4, 1, use_bias=False)]
    plain = keras.Sequential([keras.Input((5, 5, 3)), keras.layers.Conv2D(6, 3, use_bias=False),
                              keras.layers.Conv2D(4, 1, use_bias=False)])
    model = keras.Model(inputs, transposed[1](transposed[0](inputs)))
    for layer, twin in zip(transposed, plain.layers):
        shape = layer.kernel.shape  # (*spatial, O, C)
        value = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 0, size=(shape[-2], 1))
        layer.kernel.assign(value.astype("float32"))
        twin.kernel.assign(np.swapaxes(value, -1, -2).astype("float32"))
    return model, transposed, plain


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_new_layer_type(transposed, mode):
    model, layers_, plain = random_transposed_pair(seed=3)
    found = [t.variable for t in find_targets(model)]
    assert len(found) == 2 and all(a is layer.kernel for a, layer in zip(found, layers_))
    state = twin_state = None
    for epoch in (0, 1):
        report, state = keras_we.evolve(model, epoch, state, conv_ratio=0.5, crossover=mode, **CONSTANT)
        twin, twin_state = keras_we.evolve(plain, epoch, twin_state, conv_ratio=0.5, crossover=mode, **CONSTANT)
        assert (report.conv_evolved, report.changed_elements, state) == (
            twin.conv_evolved, twin.changed_elements, twin_state)
    assert report.conv_evolved > 0
    for layer, twin in zip(layers_, plain.layers):
        np.testing.assert_allclose(
            np.swapaxes(keras.ops.convert_to_numpy(layer.kernel), -1, -2),
            keras.ops.convert_to_numpy(twin.kernel), rtol=1e-6, atol=1e-9)


def test_unregistered_layer_type_is_left_alone():
    model, layers_, _ = random_transposed_pair(seed=3)
    assert find_targets(model) == []


def test_a_layout_that_does_not_fit_is_named(transposed):
    class Wrong(keras_we.layouts.RegularKernel):
        def column_items(self, shape):
            return super().column_items(shape)[:-1]

    conv = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3)])
    targets = [layers.Target(conv.layers[0].kernel, Wrong())]
    with pytest.raises(ValueError, match=r"Wrong\(\) does not fit a variable of shape \(3, 3, 2, 3\)"):
        Evolver(targets, EvolutionOptions())


def test_register_layer_checks_its_arguments():
    with pytest.raises(TypeError, match="`layer_class`"):
        keras_we.register_layer("Conv2D", lambda layer: [])
    with pytest.raises(TypeError, match="`evolvable`"):
        keras_we.register_layer(keras.layers.Conv2DTranspose, None)
    with pytest.raises(TypeError, match="`crossover`"):
        keras_we.register_crossover("midpoint")


def test_a_schedule_of_ones_own():
    """Any `keras_we.Schedule` subclass: `ratio(base, epoch)` and `get_config`;
    equal configs make equal options (so an evolver is reused)."""

    class Halving(keras_we.Schedule):
        def __init__(self, every):
            self.every = every

        def ratio(self, base_ratio, epoch):
            return base_ratio * 0.5 ** (epoch // self.every)

        def get_config(self):
            return {"every": self.every}

    options = EvolutionOptions(conv_ratio=0.4, schedule=Halving(2))
    assert options.ratios(3) == {"conv": 0.2, "gamma": 0.025, "beta": 0.025}
    assert options == EvolutionOptions(conv_ratio=0.4, schedule=Halving(2))
    assert options != EvolutionOptions(conv_ratio=0.4, schedule=Halving(3))
    assert Halving.from_config(Halving(2).get_config()) == Halving(2)
    assert repr(Halving(2)) == "Halving(every=2)"
    # A plain callable is a multiplier, wrapped once.
    wrapped = EvolutionOptions(schedule=lambda epoch: 2.0).schedule
    assert isinstance(wrapped, keras_we.MultiplierSchedule) and wrapped.ratio(0.1, 7) == 0.2
    with pytest.raises(TypeError, match="`schedule` must be None"):
        EvolutionOptions(schedule=0.5)
