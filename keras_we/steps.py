"""The step functions of one evolution over a `Plan`: the four strategies
of `keras_we.strategies` applied to a whole model's tensors.

A step is `measure` (compiled: norms and the selection counts, read from
the variables tensor by tensor), then `inferior_counts` (on the host: the
starvation counter runs from tensor to tensor), then `match` (compiled:
forward matching over all items) and `crossover`, one compiled call per
bucket of the plan that has paired items, each written before the next is
read, so that the step never holds more than a few copies of one bucket
(issue 12). `keras_we.evolution.Evolver` drives them. All but
`inferior_counts` are pure functions of tensors, so that they compile as
they are.
"""

from typing import NamedTuple

import numpy as np
from keras import ops

from keras_we import strategies
from keras_we.backend_utils import magnitude_sums, reshape, segment_min, segment_sum, static_shapes
from keras_we.plan import concatenate


class Measurement(NamedTuple):
    """What `measure` finds.

    Attributes:
        norms: per item, its L1 norm (a BatchNorm entry's magnitude).
        finite: per tensor, 1 if its norms are finite (no NaN or inf).
        important: per tensor, its globally important items (`g`).
        weak: per tensor, its locally weak items (`L`).
    """

    norms: object
    finite: object
    important: object
    weak: object


class Inferior(NamedTuple):
    """What `inferior_counts` decides, on the host.

    Attributes:
        counts: per tensor, its inferior items `k` (NumPy ints).
        counters: per group, the starvation counter after its last tensor.
        skipped: plan indices of tensors left alone for holding NaN or inf.
    """

    counts: np.ndarray
    counters: list
    skipped: list


class Matching(NamedTuple):
    """What `match` finds: per item, whether it is an inferior item with a
    partner (`paired`), and the offset from it to its partner's item
    number (`shift`)."""

    paired: object
    shift: object


class Crossed(NamedTuple):
    """What `crossover` computes for one bucket.

    Attributes:
        values: per member tensor, its new value (unchanged where nothing
            evolves).
        changed: per member tensor, how many of its values changed.
    """

    values: list
    changed: object


# ------------------------------------------------------------ compiled


def measure(plan, values, positions, local_ratio):
    """Global and local selection over the tensors' current `values`.

    A tensor is finite when its norms are, that is when it holds no NaN or
    inf (and no values so large that a norm overflows). `positions` (one
    per group) assume every tensor finite; see `inferior_counts`.
    """
    norms = item_norms(plan, values)
    finite = segment_min(ops.cast(ops.isfinite(norms), "int32"), plan.item_tensor, len(plan.sizes))
    important, weak = select(plan, norms, finite, positions, local_ratio)
    return Measurement(norms, finite, important, weak)


def item_norms(plan, values):
    """Items' L1 norms, tensor by tensor: an item's norm is the sum of its
    columns' sums of magnitudes (no tensor is copied beside the others)."""
    views = [reshape(value if plan.dtypes[t] == plan.compute_dtype else ops.cast(value, plan.compute_dtype),
                     (plan.norm_rows[t], -1))
             for t, value in enumerate(values)]
    norms = []
    for t, sums in enumerate(magnitude_sums(views)):
        layout, shape = plan.layouts[t], plan.shapes[t]
        direct = plan.norm_rows[t] != layout.rows(shape)  # the sums are the norms
        norms.append(sums if direct else layout.item_sums(sums, shape))
    return concatenate(norms, 0)


def scores(plan, norms, finite):
    """Item scores (L1 norm / input channels), +inf in skipped tensors."""
    return ops.where(ops.take(finite > 0, plan.item_tensor), norms / plan.item_channels, float("inf"))


def select(plan, norms, finite, positions, local_ratio):
    """Global selection in each group, then local selection in each tensor:
    `(important, weak)` counts per tensor."""
    item_scores = scores(plan, norms, finite)
    thresholds = [
        strategies.global_threshold(item_scores[start:end], positions[g])
        for g, (start, end) in enumerate(plan.group_items)
    ]
    threshold = thresholds[0]
    if len(thresholds) > 1:
        threshold = ops.take(ops.stack(thresholds), plan.item_group)
    return strategies.local_counts(
        item_scores, threshold, local_ratio, plan.item_tensor, len(plan.sizes))


def match(plan, norms, finite, counts):
    """Forward matching in every tensor, `counts[t]` inferior items in
    tensor `t`: a `Matching`."""
    partner, paired = strategies.forward_pairs(
        scores(plan, norms, finite), counts, plan.item_tensor, plan.sizes)
    return Matching(paired, partner - plan.item_ids)


def crossover(plan, bucket, values, norms, matching):
    """Crossover of one bucket's paired columns; `values` are its members'
    values, in order. Returns `Crossed`."""
    values = dict(zip(bucket.tensors, values))
    columns = bucket.columns(values, bucket.dtype)
    new, changed = _bucket_crossover(plan, bucket, columns, norms, matching.paired, matching.shift)
    return Crossed(bucket.split(new, plan.shapes), changed)


def _bucket_crossover(plan, bucket, columns, norms, paired, shift):
    """A bucket's new columns, and how many values of each member changed."""
    paired_columns = ops.take(paired, bucket.column_items)
    if static_shapes():
        # Compiled steps need static shapes: cross every column over, and
        # keep the result where the column is paired.
        index = None
    else:
        # Eager PyTorch gathers the paired columns and works on those alone.
        index = ops.nonzero(paired_columns)[0]
        if index.shape[0] == 0:
            return columns, ops.zeros(len(bucket.tensors), "int32")

    def gather(x):
        return x if index is None else ops.take(x, index, axis=-1)

    items = gather(bucket.column_items)
    offset = ops.take(shift, items)  # to the partner item
    column_offset = offset if bucket.column_strides is None else offset * gather(bucket.column_strides)
    partners = gather(ops.arange(columns.shape[1], dtype="int32")) + column_offset
    inferior = gather(columns)
    if index is None and bucket.rule.summarize is not None:
        # All the rule needs of a dominant column is its summary (e.g. its
        # strongest element): summarize every column, then take the
        # partners', instead of copying the partner columns whole.
        summary = bucket.rule.summarize(ops.expand_dims(columns, 1))
        dominant = ops.take(ops.squeeze(summary, 1), partners, axis=-1)
    else:
        dominant = ops.take(columns, partners, axis=1)
    pair_norms = (None, None)
    if bucket.rule.uses_norms:
        pair_norms = ops.take(norms, items), ops.take(norms, items + offset)
    # The rules take columns in filter layout, (S, 1, P).
    new = bucket.rule.apply(
        ops.expand_dims(ops.cast(inferior, plan.compute_dtype), 1),
        ops.expand_dims(ops.cast(dominant, plan.compute_dtype), 1),
        *pair_norms)
    new = ops.cast(ops.squeeze(new, 1), bucket.dtype)
    # Keep the old value in unpaired columns and where a result is not
    # finite (a value that fits float32 may overflow a narrower dtype).
    keep = ops.logical_not(ops.logical_and(ops.isfinite(new), gather(paired_columns)))
    new = ops.where(keep, inferior, new)
    moved = ops.sum(ops.cast(new != inferior, "int32"), axis=0)
    changed = segment_sum(moved, gather(bucket.column_tensors), len(bucket.tensors))
    if index is None:
        return new, changed
    # Scatter the new columns back, as rows of the transpose.
    rows = ops.scatter_update(ops.transpose(columns), ops.expand_dims(index, 1), ops.transpose(new))
    return ops.transpose(rows), changed


# ---------------------------------------------------------------- host


def inferior_counts(plan, measurement, ratios, counters, starvation_limit, reselect):
    """The starvation counters through the tensors: inferior counts.

    When some tensor is not finite, the threshold positions (which assumed
    all finite) are recomputed without it and `reselect(positions)` gives
    the `(important, weak)` counts again.
    """
    finite = np.asarray(ops.convert_to_numpy(measurement.finite)) > 0
    selection = measurement.important, measurement.weak
    if not finite.all():
        selection = reselect(plan.positions(ratios, finite))
    important, weak = (np.asarray(ops.convert_to_numpy(x)) for x in selection)
    counts, counters = np.zeros(len(plan.sizes), "int32"), list(counters)
    for g, tensors in enumerate(plan.group_tensors):
        for t in tensors:
            if finite[t]:
                counts[t], counters[g] = strategies.inferior_count(
                    plan.sizes[t], important[t], weak[t], counters[g], starvation_limit)
    return Inferior(counts, counters, np.flatnonzero(~finite).tolist())
