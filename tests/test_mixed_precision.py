"""Weight Evolution under mixed precision and with low-precision variables.

- `mixed_float16` / `mixed_bfloat16` policies (float32 variables, low
  precision compute): `fit` with the callback evolves items and keeps every
  weight finite.
- float16 and bfloat16 *variables*: `keras_we.evolve` keeps their dtype,
  writes no inf or NaN, and gives the same result as the same step on a
  float32 copy of the model cast back, although a float16 L1 norm of the
  largest filters would overflow: the scores accumulate in float32.
"""

import keras
import numpy as np
import pytest

import keras_we
from keras_we.layers import find_targets
from tests.utils import toy_data

FLOAT16_MAX = 65504.0


@pytest.fixture
def dtype_policy():
    """Sets a global dtype policy for one test and restores the old one."""
    old = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(old)


def to_float32(value):
    """Numpy float32 copy of a tensor or variable of any float dtype."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(value, "float32")))


def cnn(dtype=None, seed=0):
    """Conv2D + BN + DepthwiseConv2D + BN + Conv2D 1x1 + GAP + Dense."""
    keras.utils.set_random_seed(seed)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False, **kwargs),
            keras.layers.BatchNormalization(**kwargs),
            keras.layers.ReLU(**kwargs),
            keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, **kwargs),
            keras.layers.BatchNormalization(**kwargs),
            keras.layers.ReLU(**kwargs),
            keras.layers.Conv2D(16, 1, use_bias=False, **kwargs),
            keras.layers.GlobalAveragePooling2D(**kwargs),
            keras.layers.Dense(3, **kwargs),
        ]
    )


# ------------------------------------------------------ mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit(dtype_policy, policy):
    dtype_policy(policy)
    compute = policy.split("_")[1]
    model = cnn()
    for layer in (model.layers[0], model.layers[3]):
        weak = to_float32(layer.kernel)
        weak[..., :3] *= 1e-3  # inferior filters
        layer.kernel.assign(weak)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    targets = find_targets(model)
    assert len(targets) == 7
    for target in targets:
        assert keras.backend.standardize_dtype(target.variable.dtype) == "float32"
    assert model.layers[0].compute_dtype == compute
    x, y = toy_data()
    history = model.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[keras_we.WeightEvolution(evolve_last_epoch=True)],
    )
    h = history.history
    assert h["we_conv_evolved"][1] > 0  # the evolution after epoch 0
    assert h["we_skipped_nonfinite"] == [0, 0]
    for target in targets:
        assert keras.backend.standardize_dtype(target.variable.dtype) == "float32"
    for weight in model.weights:
        assert np.isfinite(to_float32(weight)).all(), weight.path
    # The evolved model still runs in low precision and gives finite output.
    out = model.predict(x[:4], verbose=0)
    assert np.isfinite(np.asarray(out, dtype="float32")).all()


# ------------------------------------------------ low-precision variables


def wide_range_weights(model, rng):
    """Weights whose filters range from 1e-4 to 6e4 in magnitude.

    Every conv filter gets its own scale, log-spaced from 1e-4 up to 6e4
    (float16's maximum is 65504) and growing with the filter index; BN
    gamma and beta the same per entry. The L1 norms of the two largest
    filters of the first and last conv overflow float16, so scores summed
    in float16 would tie them at inf and forward matching (ties in index
    order) would pair the inferior filters with the wrong dominant one.
    Returns the weights as float32 numpy, all exactly representable in
    float16.
    """
    weights = []
    for weight in model.weights:
        shape = tuple(weight.shape)
        if (
            weight.path.endswith(("kernel", "gamma", "beta"))
            and "dense" not in weight.path
        ):
            scales = np.logspace(-4, np.log10(6e4), shape[-1])
            values = rng.uniform(0.5, 1.0, size=shape) * scales
            values *= rng.choice([-1.0, 1.0], size=shape)
        else:
            values = to_float32(weight)
        weights.append(values.astype("float16").astype("float32"))
    return weights


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("crossover", ["paper", "reference"])
def test_low_precision_variables_match_float32(dtype, crossover):
    rng = np.random.default_rng(1)
    low = cnn(dtype)
    high = cnn("float32")
    weights = wide_range_weights(high, rng)
    high.set_weights(weights)
    low.set_weights(weights)
    if dtype == "bfloat16":
        # bfloat16 holds fewer mantissa bits: start both from bfloat16 values.
        high.set_weights([to_float32(w) for w in low.weights])
    low_targets, high_targets = find_targets(low), find_targets(high)
    for target in low_targets:
        assert keras.backend.standardize_dtype(target.variable.dtype) == dtype

    # The setup is meaningful: a float16 L1 norm of the largest filters overflows.
    kernel = to_float32(low.layers[0].kernel).astype("float16")
    with np.errstate(over="ignore"):
        norms16 = np.sum(np.abs(kernel), axis=(0, 1, 2), dtype="float16")
    assert np.isinf(norms16[-2:]).all()
    assert np.isfinite(np.sum(np.abs(kernel.astype("float32")), axis=(0, 1, 2))).all()

    options = {"crossover": crossover, "gamma_ratio": 0.3, "beta_ratio": 0.3}
    state_low = state_high = None
    evolved = dict.fromkeys(("conv", "gamma", "beta"), 0)
    for epoch in range(2):
        before = [to_float32(t.variable) for t in low_targets]
        report_low, state_low = keras_we.evolve(low, epoch, state_low, **options)
        report_high, state_high = keras_we.evolve(high, epoch, state_high, **options)
        assert report_low.skipped == []
        assert state_low == state_high
        for group in ("conv", "gamma", "beta"):
            assert getattr(report_low, f"{group}_evolved") == getattr(
                report_high, f"{group}_evolved"
            ), group
            evolved[group] += getattr(report_low, f"{group}_evolved")
        changed = 0
        for t_low, t_high, old in zip(low_targets, high_targets, before):
            assert keras.backend.standardize_dtype(t_low.variable.dtype) == dtype
            got = to_float32(t_low.variable)
            assert np.isfinite(got).all(), t_low.path
            expected = to_float32(keras.ops.cast(t_high.variable, dtype))
            # Both are the float32 step rounded once to `dtype`.
            np.testing.assert_allclose(
                got,
                expected,
                rtol=1e-3 if dtype == "float16" else 8e-3,
                atol=0,
                err_msg=t_low.path,
            )
            changed += int((got != old).sum())
            # Keep the float32 copy on the low-precision grid for the next step.
            t_high.variable.assign(got)
        assert changed == report_low.changed_elements
    assert all(count > 0 for count in evolved.values()), evolved


def test_float16_filters_at_the_top_of_the_range():
    """Dominant filters near float16's maximum (L1 norms far beyond it): the
    inferior filter evolves towards them, nothing overflows, and the
    dominant filters come back bit for bit."""
    model = cnn("float16")
    kernel = model.layers[0].kernel
    values = np.full(tuple(kernel.shape), 6e4, dtype="float32")
    values[..., 0] = 1e-4  # one inferior filter next to huge dominant ones
    values[0, 0, 0, 0] = 2e-4
    kernel.assign(values)
    report, _ = keras_we.evolve(model, 0)
    after = to_float32(kernel)
    assert keras.backend.standardize_dtype(kernel.dtype) == "float16"
    assert np.isfinite(after).all()
    assert report.conv_evolved >= 1
    # Dominant filters are never written.
    np.testing.assert_array_equal(after[..., 1:], values[..., 1:].astype("float16"))
    # The inferior filter moved towards the dominant one and stays <= max.
    assert (after[..., 0] != values[..., 0].astype("float16")).any()
    assert np.abs(after).max() <= FLOAT16_MAX
