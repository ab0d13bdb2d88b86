"""The backend shims of `keras_we.backend_utils`, on the current backend."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_we import backend_utils


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("name", ["segment_sum", "segment_max", "segment_min"])
def test_segments_keep_float64(name):
    # Values that float32 cannot tell apart (1 + 2^-40) and a sum that
    # float32 would round (2^30 + 1 + 2^-20).
    data = np.array([1.0, 1.0 + 2.0**-40, 2.0**30, 1.0, 2.0**-20, 5.0], "float64")
    ids = np.array([0, 0, 1, 1, 1, 2], "int32")
    tensor = ops.convert_to_tensor(data)
    # JAX holds float64 only with `jax_enable_x64`; then it is float32 here.
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    reduce = {"segment_sum": np.add, "segment_max": np.maximum, "segment_min": np.minimum}[name]
    want = np.array([reduce.reduce(data.astype(dtype)[ids == s]) for s in range(3)])
    got = numpy(getattr(backend_utils, name)(tensor, ops.convert_to_tensor(ids), 3))
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    np.testing.assert_array_equal(got, want)
    if keras.backend.backend() != "jax":
        assert dtype == "float64"


@pytest.mark.parametrize("name", ["segment_sum", "segment_max", "segment_min"])
def test_segments_of_ints_match_keras(name):
    rng = np.random.default_rng(0)
    data = ops.convert_to_tensor(rng.integers(-50, 50, 40).astype("int32"))
    ids = ops.convert_to_tensor(np.sort(rng.integers(0, 6, 40)).astype("int32"))
    ids = ops.convert_to_tensor(np.r_[np.arange(6), numpy(ids)[6:]].astype("int32"))  # none empty
    got = numpy(getattr(backend_utils, name)(data, ids, 6))
    want = numpy(getattr(ops, name)(data, ids, num_segments=6))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_both_step_styles_compute_the_same_evolution(monkeypatch, mode):
    """The steps' two backend-dependent choices (`static_shapes`: all columns
    or the paired ones; norms by layout or in one segment sum) agree
    exactly, on every backend, run eagerly."""
    from keras_we import steps
    from keras_we.evolution import EvolutionOptions, Evolver
    from keras_we.layers import find_targets

    options = EvolutionOptions(conv_ratio=0.5, gamma_ratio=0.5, beta_ratio=0.5,
                               schedule=lambda epoch: 1.0, crossover=mode)
    results = []
    for static in (True, False):
        monkeypatch.setattr(steps, "static_shapes", lambda: static)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
            keras.layers.Conv2D(6, 1, use_bias=False),
            keras.layers.BatchNormalization(),
        ])
        rng = np.random.default_rng(1)
        for variable in model.trainable_variables:
            value = numpy(variable) + rng.normal(0.5, 0.2, size=variable.shape)
            scale = 10.0 ** rng.uniform(-3, 0, size=variable.shape[-1])
            variable.assign((value * scale).astype("float32"))
        report, state = Evolver(find_targets(model), options, run_eagerly=True)(0, None)
        results.append(([numpy(v) for v in model.trainable_variables], report, state))
    (static_values, static_report, static_state), (eager_values, eager_report, eager_state) = results
    assert static_report.conv_evolved > 0 and static_report.gamma_evolved > 0
    assert (static_report, static_state) == (eager_report, eager_state)
    for a, b in zip(static_values, eager_values):
        np.testing.assert_array_equal(a, b)


def test_variable_function_reads_and_writes():
    a = keras.Variable(np.arange(6, dtype="float32").reshape(2, 3))
    b = keras.Variable(np.ones(3, "float32"))

    def double(values, scale):
        return [v * scale for v in values], ops.sum(values[0])

    call = backend_utils.variable_function(double, [a, b], writes=True)
    total = call(ops.convert_to_tensor(2.0), write=[True, False])
    assert float(numpy(total)) == 15.0
    np.testing.assert_array_equal(numpy(a), 2 * np.arange(6).reshape(2, 3))
    # TensorFlow writes every variable (an unchanged value would read back
    # the same); here `b` gets a new value, so the mask shows.
    want_b = 2.0 if keras.backend.backend() == "tensorflow" else 1.0
    np.testing.assert_array_equal(numpy(b), np.full(3, want_b))


def test_stable_argsort_keeps_ties_in_index_order_on_numpy_too(monkeypatch):
    """NumPy's default argsort may be an unstable SIMD sort; the NumPy
    backend branch asks for a stable one (ties: dead filters' zero scores)."""
    scores = np.array([2, 2, 2, 2, 8, 8, 2, 2] * 4, "float32")
    want = np.argsort(-scores, kind="stable")
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    np.testing.assert_array_equal(backend_utils.stable_argsort(-scores), want)


@pytest.mark.parametrize("largest", [True, False])
def test_first_extreme_index_takes_the_first_of_tied_extremes(largest):
    # Columns of 9 values drawn from 3 levels, so that most columns hold
    # their extreme several times; the answer is NumPy's first index.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(9, 2, 500)).astype("float32")
    x[:, 0, 0] = 1.0  # all tied
    got = numpy(backend_utils.first_extreme_index(ops.convert_to_tensor(x), largest))
    want = np.argmax(x, axis=0) if largest else np.argmin(x, axis=0)
    assert got.shape == (2, 500) and got[0, 0] == 0
    np.testing.assert_array_equal(got, want)
    assert (np.sum(x == (x.max(0) if largest else x.min(0)), axis=0) > 1).mean() > 0.5
