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


@pytest.mark.parametrize("mask", [[0, 1, 1, 0, 1], [0, 0, 0], [1, 1]])
def test_true_indices(mask):
    mask = np.array(mask, bool)
    got = backend_utils.true_indices(ops.convert_to_tensor(mask))
    if keras.backend.backend() != "torch":
        assert got is None  # compiled, static shapes: every position
    else:
        np.testing.assert_array_equal(numpy(got), np.flatnonzero(mask))


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
