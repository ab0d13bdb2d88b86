"""Properties of one evolution step on random layer stacks (hypothesis).

Kernels of random shapes with magnitudes from 1e-8 to 1e4, exact zeros and
single-filter layers go through an `Evolver` on bare variables (the steps
the callback compiles, run eagerly) and through `keras_we.evolve` on real
layers. On JAX, which compiles every op for each new shape, they take
minutes and run with the `slow` tests.
"""

import math

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_we
from keras_we import layouts, strategies
from keras_we.evolution import EvolutionOptions, Evolver
from keras_we.layers import Target
from tests.utils import SLOW_ON_JAX

pytestmark = SLOW_ON_JAX

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def kernel_stacks(draw):
    """A few conv kernels in filter layout (S, C, O), as float32 numpy."""
    kernels = []
    for _ in range(draw(st.integers(1, 4))):
        spatial = draw(st.sampled_from([1, 3, 9]))
        channels = draw(st.integers(1, 3))
        filters = draw(st.integers(1, 6))
        seed = draw(st.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        magnitude = 10.0 ** rng.uniform(-8, 4, size=filters)
        values = rng.normal(size=(spatial, channels, filters)) * magnitude
        values[rng.random(values.shape) < 0.1] = 0.0
        if draw(st.booleans()):
            values[..., 0] = 0.0  # a dead filter
        kernels.append(values.astype("float32"))
    return kernels


def run_group(kernels, ratio, mode, counter=0, local_ratio=0.1):
    """One eager step on kernels given in filter layout (Conv1D-shaped),
    with a starvation limit of 1."""
    variables = [keras.Variable(k) for k in kernels]
    options = EvolutionOptions(
        conv_ratio=ratio, local_ratio=local_ratio, force_divisor=len(kernels),
        schedule=lambda epoch: 1.0, crossover=mode)
    evolver = Evolver([Target(v, layouts.REGULAR_KERNEL) for v in variables], options, run_eagerly=True)
    report, state = evolver(0, {"conv_counter": counter, "gamma_counter": 0, "beta_counter": 0})
    assert report.skipped == [] and evolver.starvation_limit == 1
    results = [keras.ops.convert_to_numpy(v) for v in variables]
    assert report.changed_elements == sum(int((r != k).sum()) for r, k in zip(results, kernels))
    return results, state["conv_counter"], report.conv_evolved


def scores_of(kernel):
    return np.abs(kernel.astype("float64")).sum(axis=(0, 1)) / kernel.shape[1]


@SETTINGS
@given(kernel_stacks(), st.floats(0, 1), st.sampled_from(["paper", "reference"]))
def test_step_invariants(kernels, ratio, mode):
    results, _, evolved = run_group(kernels, ratio, mode)
    all_scores = np.concatenate([scores_of(k) for k in kernels]).astype("float32")
    position = strategies.threshold_position(all_scores.size, ratio)
    threshold = np.sort(all_scores)[position]
    changed_filters = expected_evolved = 0
    for before, after in zip(kernels, results):
        # Shapes and dtypes are kept, and nothing non-finite appears.
        assert after.shape == before.shape and after.dtype == before.dtype
        assert np.isfinite(after).all()
        changed = np.any(before != after, axis=(0, 1))
        changed_filters += int(changed.sum())
        # The inferior filters are the k lowest-scoring ones (ties in index
        # order), k as local selection and forcing give it (the starvation
        # limit is 1: every starved kernel is forced); only they change,
        # so globally important and dominant filters never do.
        scores = scores_of(before).astype("float32")
        n, important = len(scores), int((scores >= threshold).sum())
        weak = int((scores <= np.float32(0.1) * scores.max()).sum())
        k = 0 if important == n else min(max(weak, 1), n - important)
        inferior = np.argsort(-scores, kind="stable")[n - k:]
        assert set(np.flatnonzero(changed)) <= set(inferior[: min(k, n - k)].tolist())
        expected_evolved += min(k, n - k)
        # The element path rewrites, in a channel it changes, exactly the
        # values equal to that channel's first smallest-magnitude element,
        # all of them to the same value.
        if before.shape[0] > 1:
            for c in range(before.shape[1]):
                for o in np.flatnonzero(changed):
                    moved = before[:, c, o] != after[:, c, o]
                    if moved.any():
                        smallest = before[np.argmin(np.abs(before[:, c, o])), c, o]
                        np.testing.assert_array_equal(moved, before[:, c, o] == smallest)
                        assert len(set(after[moved, c, o].tolist())) == 1
    # Every pair is counted, changed or not (a crossover may leave a filter
    # as it was, e.g. a zero denominator).
    assert evolved == expected_evolved
    assert changed_filters <= evolved


@SETTINGS
@given(kernel_stacks(), st.sampled_from(["paper", "reference"]))
def test_zero_ratio_changes_nothing_and_steps_are_deterministic(kernels, mode):
    results, _, evolved = run_group(kernels, 0.0, mode)
    assert evolved == 0
    for before, after in zip(kernels, results):
        np.testing.assert_array_equal(before, after)
    first = run_group(kernels, 0.7, mode)
    second = run_group(kernels, 0.7, mode)
    for a, b in zip(first[0], second[0]):
        np.testing.assert_array_equal(a, b)
    assert first[1:] == second[1:]


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.sampled_from(["paper", "reference"]))
def test_evolve_on_real_layers_keeps_dominant_filters(seed, mode):
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(5, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
            keras.layers.Conv2D(1, 1, use_bias=False),  # a single-filter layer
        ]
    )
    for variable in model.trainable_weights:
        shape = variable.shape
        magnitude = 10.0 ** rng.uniform(-8, 4, size=shape[-1])
        value = rng.normal(size=shape) * magnitude
        value[rng.random(shape) < 0.1] = 0.0
        variable.assign(value.astype("float32"))
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    report, _ = keras_we.evolve(model, 40, conv_ratio=0.5, gamma_ratio=0.5, beta_ratio=0.5, crossover=mode)
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and np.isfinite(a).all()
    # The strongest filter of each kernel is always dominant.
    for index in (0, 3, 4):
        b, a = before[index], after[index]
        flat_b, flat_a = b.reshape(-1, b.shape[-2] * b.shape[-1]), a.reshape(-1, b.shape[-2] * b.shape[-1])
        if index == 3:  # depthwise: filters are (channel, multiplier) pairs
            best = np.argmax(np.abs(flat_b).sum(axis=0))
            np.testing.assert_array_equal(flat_b[:, best], flat_a[:, best])
        else:
            best = np.argmax(np.abs(b).sum(axis=tuple(range(b.ndim - 1))))
            np.testing.assert_array_equal(b[..., best], a[..., best])
    # A single-filter layer has no partner and never changes.
    np.testing.assert_array_equal(before[4], after[4])
    assert report.changed_elements == sum(int((a != b).sum()) for a, b in zip(after, before))
    assert not math.isnan(report.conv_ratio)
