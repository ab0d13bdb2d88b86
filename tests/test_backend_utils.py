"""The backend shims of `keras_we.backend_utils`, on the current backend."""

import os

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
    """The steps' two styles (`static_shapes`: every column crossed over and
    the members stored whole, or the paired columns alone, gathered and
    written back in place) agree exactly, on every backend, run eagerly."""
    from keras_we import evolution
    from keras_we.evolution import EvolutionOptions, Evolver
    from keras_we.layers import find_targets

    options = EvolutionOptions(conv_ratio=0.5, gamma_ratio=0.5, beta_ratio=0.5,
                               schedule=lambda epoch: 1.0, crossover=mode)
    results = []
    for static in (True, False):
        monkeypatch.setattr(evolution, "static_shapes", lambda: static)
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


def test_gather_and_scatter_columns_touch_only_those_columns():
    """The eager step's column access: `gather_columns` reads the columns
    of several variables seen as `(rows, -1)`, `scatter_columns` writes
    new ones back there and nowhere else; on PyTorch in place."""
    kernel = np.arange(3 * 3 * 2 * 4, dtype="float32").reshape(3, 3, 2, 4)
    other = np.arange(100, 100 + 3 * 3 * 1 * 2, dtype="float32").reshape(3, 3, 1, 2)
    variables = [keras.Variable(kernel), keras.Variable(other)]
    indices = [np.asarray([1, 6]), np.asarray([0])]
    values = [v.value for v in variables]
    got = numpy(backend_utils.gather_columns(values, 9, indices))
    want = np.concatenate([kernel.reshape(9, 8)[:, [1, 6]], other.reshape(9, 2)[:, [0]]], 1)
    np.testing.assert_array_equal(got, want)

    pointers = [v.value.data_ptr() for v in variables] if keras.backend.backend() == "torch" else None
    new = -np.arange(27, dtype="float32").reshape(9, 3)
    backend_utils.scatter_columns(variables, values, 9, indices, ops.convert_to_tensor(new))
    want_kernel, want_other = kernel.reshape(9, 8).copy(), other.reshape(9, 2).copy()
    want_kernel[:, [1, 6]], want_other[:, [0]] = new[:, :2], new[:, 2:]
    np.testing.assert_array_equal(numpy(variables[0]), want_kernel.reshape(kernel.shape))
    np.testing.assert_array_equal(numpy(variables[1]), want_other.reshape(other.shape))
    if pointers is not None:  # written in place: no new storage
        assert [v.value.data_ptr() for v in variables] == pointers


def test_scatter_columns_assigns_a_non_contiguous_torch_value():
    """A PyTorch value that cannot be viewed as `(rows, -1)` (here a
    transposed one) is updated on a copy, then assigned whole."""
    if keras.backend.backend() != "torch":
        pytest.skip("only PyTorch writes in place")
    import torch

    variable = keras.Variable(np.zeros((3, 4), "float32"))
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    variable._value = torch.nn.Parameter(base.t(), requires_grad=True)  # (3, 4), not contiguous
    assert not variable.value.is_contiguous()
    before = base.t().numpy().copy()
    backend_utils.scatter_columns([variable], [variable.value], 3, [np.asarray([2])],
                                  torch.full((3, 1), -1.0))
    before[:, 2] = -1.0
    np.testing.assert_array_equal(numpy(variable), before)


def test_stable_argsort_keeps_ties_in_index_order_on_numpy_too(monkeypatch):
    """NumPy's default argsort may be an unstable SIMD sort; the NumPy
    backend branch asks for a stable one (ties: dead filters' zero scores)."""
    scores = np.array([2, 2, 2, 2, 8, 8, 2, 2] * 4, "float32")
    want = np.argsort(-scores, kind="stable")
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    np.testing.assert_array_equal(backend_utils.stable_argsort(-scores), want)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("rows", [9, backend_utils.UNROLLED_ROWS + 11])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_first_extreme_takes_the_first_of_tied_extremes(largest, rows, compiled):
    # Columns of `rows` values drawn from 5 signed levels, so that most
    # columns hold their extreme magnitude several times, with both signs;
    # the answer is the value at NumPy's first index. TensorFlow walks up
    # to UNROLLED_ROWS rows one by one and reduces longer columns; both
    # eager and as a step compiles it (XLA on TensorFlow, jit on JAX).
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(rows, 2, 500)).astype("float32")
    x[:, 0, 0] = 1.0  # all tied
    x[:, 0, 1] = [(-1) ** i for i in range(rows)]  # tied magnitudes, the first is +1
    magnitudes = np.abs(x)
    if compiled:
        run = backend_utils.variable_function(
            lambda values: backend_utils.first_extreme(backend_utils.reshape(values[0], x.shape), largest),
            [keras.Variable(x)])
        got = numpy(run())
    else:
        got = numpy(backend_utils.first_extreme(ops.convert_to_tensor(x), largest))
    first = np.argmax(magnitudes, axis=0) if largest else np.argmin(magnitudes, axis=0)
    want = np.take_along_axis(x, first[None], axis=0)[0]
    assert got.shape == (2, 500) and got[0, 0] == 1 and got[0, 1] == 1
    np.testing.assert_array_equal(got, want)
    extreme = magnitudes.max(0) if largest else magnitudes.min(0)
    ties = np.sum(magnitudes == extreme, axis=0) > 1
    assert ties.mean() > 0.5
    # Where tied magnitudes differ in sign, only the first index is right.
    assert (ties & (np.sum(x == -want, axis=0) > 0)).mean() > 0.2


@pytest.mark.parametrize("scratch_bytes", [64, 2**18, 2**40])
def test_magnitude_sums_whatever_the_scratch_buffer(monkeypatch, scratch_bytes):
    # PyTorch sums through a bounded scratch buffer, a block of columns at a
    # time (64 bytes: one column of the tall tensor at a time); every
    # backend gives NumPy's column sums of magnitudes.
    monkeypatch.setattr(backend_utils, "SCRATCH_BYTES", scratch_bytes)
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=shape).astype("float32") for shape in [(9, 100), (300, 7), (1, 5)]]
    got = backend_utils.magnitude_sums([ops.convert_to_tensor(a) for a in arrays])
    for a, g in zip(arrays, got):
        np.testing.assert_allclose(numpy(g), np.abs(a).sum(axis=0), rtol=1e-6)


def test_many_variable_functions_compute_and_do_not_warn_of_retracing(caplog):
    # A step makes one compiled function per bucket; each traces once.
    # TensorFlow counts traces per code object, so closures made in a loop
    # once warned of "frequent retracing" (seen in CI's smoke run).
    variables = [keras.Variable(np.full((3,), float(i), "float32")) for i in range(8)]
    calls = [
        backend_utils.variable_function(
            lambda values, scale: ([values[0] * scale], ops.sum(values[0])), [v], writes=True)
        for v in variables
    ]
    with caplog.at_level("WARNING"):
        for _ in range(2):
            sums = [float(numpy(call(ops.convert_to_tensor(2.0, "float32")))) for call in calls]
    # The second round reads what the first wrote.
    assert sums == [6.0 * i for i in range(8)]
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(numpy(v), np.full((3,), 4.0 * i))
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def test_take_and_index_tensor():
    x = ops.convert_to_tensor(np.arange(12, dtype="float32").reshape(4, 3))
    indices = backend_utils.index_tensor(np.array([3, 0, 0, 2]))
    want = "int64" if keras.backend.backend() == "torch" else "int32"
    assert keras.backend.standardize_dtype(indices.dtype) == want
    np.testing.assert_array_equal(numpy(backend_utils.take(x, indices)), numpy(x)[[3, 0, 0, 2]])
    np.testing.assert_array_equal(numpy(backend_utils.take(x[:, 0] > 4, indices)), [True, False, False, True])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident size is read on Linux only")
def test_resident_bytes_follows_the_process():
    before = backend_utils.resident_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MB, every page touched
    grown = backend_utils.resident_bytes() - before
    del block
    assert before > 0 and 60 * 2**20 <= grown <= 80 * 2**20
