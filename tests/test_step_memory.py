"""The step works on one bucket at a time (issue 12): how the plan cuts its
tensors into buckets must not change what a step computes."""

import keras
import numpy as np
import pytest

from keras_we import plan as plan_lib
from keras_we.evolution import EvolutionOptions, Evolver
from keras_we.layers import find_targets


def _model(seed):
    """3x3, 1x1 and depthwise kernels of several channel counts, with BN,
    weights spread over three decades (some filters nearly dead)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for filters in (8, 16, 16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = keras.layers.Conv2D(filters, 1, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    rng = np.random.default_rng(seed)
    for target in find_targets(model):
        value = keras.ops.convert_to_numpy(target.variable)
        scale = 10.0 ** rng.uniform(-3, 0, size=value.shape[-1])
        scale[rng.random(value.shape[-1]) < 0.1] = 1e-6
        if not target.layout.is_kernel:
            value = value + rng.normal(0.5, 0.2, size=value.shape)
        target.variable.assign((value * scale).astype("float32"))
    return model


def _steps(model, crossover, epochs=3):
    evolver = Evolver(find_targets(model), EvolutionOptions(crossover=crossover))
    state, reports = None, []
    for epoch in range(epochs):
        report, state = evolver(epoch, state)
        reports.append(report)
    return evolver, reports, [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.parametrize("crossover", ["reference", "paper"])
def test_buckets_do_not_change_the_step(monkeypatch, crossover):
    monkeypatch.setattr(plan_lib, "MIN_BUCKET_BYTES", 0)
    monkeypatch.setattr(plan_lib, "BUCKET_FRACTION", 100.0)  # no cut
    whole, whole_reports, whole_weights = _steps(_model(3), crossover)
    monkeypatch.setattr(plan_lib, "BUCKET_FRACTION", 1e-4)  # every tensor alone
    cut, cut_reports, cut_weights = _steps(_model(3), crossover)

    # One bucket per (rule, rows, dtype) against one per tensor.
    assert len(whole.plan.buckets) == len({(b.rule, b.rows) for b in whole.plan.buckets}) < 10
    assert len(cut.plan.buckets) == len(cut.plan.shapes) == 28
    assert sum(r.conv_evolved for r in whole_reports) > 10
    assert [r.changed_elements for r in cut_reports] == [r.changed_elements for r in whole_reports]
    for a, b in zip(whole_weights, cut_weights):
        np.testing.assert_array_equal(a, b)


def _costs(plan):
    return [bucket.nbytes + plan_lib.COLUMN_BYTES * sum(bucket.widths) for bucket in plan.buckets]


def test_buckets_stay_within_their_budget(monkeypatch):
    """A bucket costs at most BUCKET_FRACTION of the plan's bytes, or holds
    one tensor; a 1x1 kernel has one column per filter for whole-filter
    crossover."""
    monkeypatch.setattr(plan_lib, "MIN_BUCKET_BYTES", 0)
    evolver = Evolver(find_targets(_model(0)), EvolutionOptions())
    plan = evolver.plan
    total = sum(int(np.prod(s)) * 4 for s in plan.shapes)
    assert len(plan.buckets) > 10
    for bucket, cost in zip(plan.buckets, _costs(plan)):
        assert len(bucket.tensors) == 1 or cost <= plan_lib.BUCKET_FRACTION * total
        for t, width in zip(bucket.tensors, bucket.widths):
            shape = plan.shapes[t]
            if bucket.rule.filterwise:  # 1x1 kernels: (C, O) viewed as O whole filters
                assert (bucket.rows, width) == (shape[-2], shape[-1])
            else:
                assert bucket.rows * width == int(np.prod(shape))
    assert any(b.rule.filterwise for b in plan.buckets)


def test_small_buckets_merge_up_to_the_floor(monkeypatch):
    """A bucket may always hold MIN_BUCKET_BYTES (each bucket is one call):
    a floor of a quarter of the plan's cost cuts it into a few buckets, each
    within the floor unless it holds one tensor."""
    monkeypatch.setattr(plan_lib, "MIN_BUCKET_BYTES", 0)
    fine = Evolver(find_targets(_model(0)), EvolutionOptions()).plan
    floor = sum(_costs(fine)) // 4
    monkeypatch.setattr(plan_lib, "MIN_BUCKET_BYTES", floor)
    coarse = Evolver(find_targets(_model(0)), EvolutionOptions()).plan
    keys = {(b.rule, b.rows, b.dtype) for b in fine.buckets}
    assert len(keys) <= len(coarse.buckets) <= len(keys) + 4 < len(fine.buckets)
    for bucket, cost in zip(coarse.buckets, _costs(coarse)):
        assert len(bucket.tensors) == 1 or cost <= floor


@pytest.mark.parametrize("fraction, releases", [(1e9, 0), (0.0, None)])
def test_freed_memory_goes_back_once_the_step_has_grown(monkeypatch, fraction, releases):
    """The step gives freed memory back to the system (`malloc_trim`) after
    measuring, after matching and after each bucket, but only once the
    process has grown by more than RELEASE_FRACTION of the plan's bytes
    since the step began: here every check sees 1 byte more than the last."""
    from keras_we import evolution

    resident, calls = [0], []
    monkeypatch.setattr(evolution, "resident_bytes", lambda: resident.append(resident[-1] + 1) or resident[-1])
    monkeypatch.setattr(evolution, "release_free_memory", lambda: calls.append(len(resident)))
    monkeypatch.setattr(evolution, "RELEASE_FRACTION", fraction)
    _, reports, _ = _steps(_model(0), "reference", epochs=1)
    checks = len(resident) - 2  # the first read is the step's start
    assert reports[0].conv_evolved > 0 and checks >= 3  # measure, match, a bucket at least
    assert len(calls) == (checks if releases is None else releases)


def test_matching_holds_little_beside_the_scores():
    """Forward matching of 60,000 items (a MobileNetV2 has 52,632), a third
    of them inferior, holds at most 40 bytes an item at once beside its
    4-byte scores: the sort order, the two results and the pairs (33
    measured; 77 when it kept six arrays the size of the items)."""
    import tracemalloc

    from keras_we import strategies

    rng = np.random.default_rng(0)
    sizes = rng.integers(16, 1000, size=120)
    sizes = sizes * 60_000 // sizes.sum()
    counts = sizes // 3
    scores = rng.random(sizes.sum()).astype("float32")
    layer_ids = np.repeat(np.arange(len(sizes), dtype="int32"), sizes)
    tracemalloc.start()
    partner, paired = strategies.forward_pairs(scores, counts, layer_ids, sizes.tolist())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert int(paired.sum()) == int(counts.sum())
    assert peak <= 40 * len(scores), peak / len(scores)


def test_eager_steps_write_the_variables_in_place():
    """On PyTorch the step writes into the variables' own storage (no new
    tensor per variable), and the values it changes do change."""
    if keras.backend.backend() != "torch":
        pytest.skip("compiled steps store new values; only PyTorch's eager step writes in place")
    model = _model(4)
    targets = find_targets(model)
    pointers = [t.variable.value.data_ptr() for t in targets]
    before = [keras.ops.convert_to_numpy(t.variable) for t in targets]
    evolver, reports, _ = _steps(model, "reference", epochs=2)
    assert sum(r.changed_elements for r in reports) > 0
    changed = [not np.array_equal(b, keras.ops.convert_to_numpy(t.variable)) for b, t in zip(before, targets)]
    assert sum(changed) >= 5
    assert [t.variable.value.data_ptr() for t in targets] == pointers
