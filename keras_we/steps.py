"""The step functions of one evolution over a `Plan`: the four strategies
of `keras_we.strategies` applied to a whole model's tensors.

A step is `measure` (compiled: norms, scores and the selection counts,
read from the variables tensor by tensor), then, on the host,
`inferior_counts` (the starvation counter runs from tensor to tensor) and
`match` (forward matching: a few thousand scores, ranked in NumPy), then
one crossover per bucket of the plan that has paired items, each written
before the next is read. Compiled backends run `crossover` (every column of
the bucket, the members stored whole: a few copies of one bucket at most);
eager PyTorch runs `crossover_in_place` (the paired columns alone, read and
written back in place). Either way a step never holds a copy of the model
(issue 12). `keras_we.evolution.Evolver` drives them. `measure` and
`crossover` are pure functions of tensors, so that they compile as they
are.
"""

from typing import NamedTuple

import numpy as np
from keras import ops

from keras_we import strategies
from keras_we.backend_utils import (
    concatenate, gather_columns, magnitude_sums, reshape, scatter_columns, segment_min, segment_sum, take)


class Measurement(NamedTuple):
    """What `measure` finds.

    Attributes:
        norms: per item, its L1 norm (a BatchNorm entry's magnitude).
        scores: per item, its score (see `scores`).
        finite: per tensor, 1 if its norms are finite (no NaN or inf).
        important: per tensor, its globally important items (`g`).
        weak: per tensor, its locally weak items (`L`).
    """

    norms: object
    scores: object
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
    """What `match` finds, as NumPy arrays: per item, whether it is an
    inferior item with a partner (`paired`), and the offset from it to its
    partner's item number (`shift`)."""

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
    item_scores = scores(plan, norms, finite)
    important, weak = select(plan, item_scores, positions, local_ratio)
    return Measurement(norms, item_scores, finite, important, weak)


def item_norms(plan, values):
    """Items' L1 norms, tensor by tensor: an item's norm is the sum of its
    columns' sums of magnitudes (no tensor is copied beside the others).
    Runs of tensors whose values are their items (BatchNorm vectors) take
    one `abs` of their concatenation, not one call each."""
    values = [value if plan.dtypes[t] == plan.compute_dtype else ops.cast(value, plan.compute_dtype)
              for t, value in enumerate(values)]
    kernels = [t for t in range(len(values)) if not plan.entrywise[t]]
    sums = dict(zip(kernels, magnitude_sums([reshape(values[t], (plan.norm_rows[t], -1))
                                             for t in kernels])))
    norms, run = [], []
    for t, value in enumerate(values):
        if plan.entrywise[t]:
            run.append(value)
            continue
        if run:
            norms.append(ops.abs(concatenate(run, 0)))
            run = []
        layout, shape = plan.layouts[t], plan.shapes[t]
        direct = plan.norm_rows[t] != layout.rows(shape)  # the sums are the norms
        norms.append(sums[t] if direct else layout.item_sums(sums[t], shape))
    if run:
        norms.append(ops.abs(concatenate(run, 0)))
    return concatenate(norms, 0)


def scores(plan, norms, finite):
    """Item scores (L1 norm / input channels), +inf in skipped tensors."""
    return ops.where(take(finite > 0, plan.item_tensor), norms / plan.item_channels, float("inf"))


def select(plan, item_scores, positions, local_ratio):
    """Global selection in each group, then local selection in each tensor:
    `(important, weak)` counts per tensor."""
    thresholds = [
        strategies.global_threshold(item_scores[start:end], positions[g])
        for g, (start, end) in enumerate(plan.group_items)
    ]
    threshold = thresholds[0]
    if len(thresholds) > 1:
        threshold = take(ops.stack(thresholds), plan.item_group)
    return strategies.local_counts(
        item_scores, threshold, local_ratio, plan.item_tensor, len(plan.sizes))


def crossover(plan, bucket, values, norms, matching):
    """Crossover of one bucket, compiled: `values` are its members' values,
    in order. Returns `Crossed`.

    Compiled steps need static shapes: every column is crossed over, and
    the result kept where the column is paired.
    """
    values = dict(zip(bucket.tensors, values))
    columns = bucket.columns(values, bucket.dtype)
    paired = ops.take(matching.paired, bucket.column_items)
    offset = ops.take(matching.shift, bucket.column_items)  # to the partner item
    column_offset = offset if bucket.column_strides is None else offset * bucket.column_strides
    partners = ops.arange(columns.shape[1], dtype="int32") + column_offset
    if bucket.rule.summarize is not None:
        # All the rule needs of a dominant column is its summary (e.g. its
        # strongest element): summarize every column, then take the
        # partners', instead of copying the partner columns whole.
        summary = bucket.rule.summarize(ops.expand_dims(columns, 1))
        dominant = ops.take(ops.squeeze(summary, 1), partners, axis=-1)
    else:
        dominant = ops.take(columns, partners, axis=1)
    pair_norms = (None, None)
    if bucket.rule.uses_norms:
        pair_norms = ops.take(norms, bucket.column_items), ops.take(norms, bucket.column_items + offset)
    new, moved = _apply_rule(plan, bucket, columns, dominant, pair_norms, paired)
    changed = segment_sum(moved, bucket.column_tensors, len(bucket.tensors))
    return Crossed(bucket.split(new, plan.shapes), changed)


def crossover_in_place(plan, bucket, variables, norms, matching):
    """Crossover of one bucket, eager (PyTorch): only the paired columns
    are read from `variables` (the members, in order), crossed over, and
    written back in place, so that the step holds no copy of a member,
    only the paired columns.

    `norms` and `matching` are NumPy arrays: which columns are paired is
    known on the host. Returns, per member, how many values changed.
    """
    index = np.flatnonzero(matching.paired[bucket.host_column_items])
    changed = np.zeros(len(bucket.tensors), "int64")
    if not index.size:
        return changed
    item = bucket.host_column_items[index]
    partner = index + matching.shift[item] * bucket.host_strides[index]
    # The paired columns of each member, in member coordinates (`index` is
    # sorted, so each member's are one run of it).
    starts = [start for start, _ in bucket.member_columns]
    bounds = np.searchsorted(index, [*starts, bucket.member_columns[-1][1]])
    members = np.flatnonzero(np.diff(bounds))
    own, partners = ([columns[bounds[m]:bounds[m + 1]] - starts[m] for m in members]
                     for columns in (index, partner))
    values = [variables[m].value for m in members]
    pair_norms = (None, None)
    if bucket.rule.uses_norms:
        pair_norms = tuple(ops.convert_to_tensor(norms[i]) for i in (item, item + matching.shift[item]))
    inferior = gather_columns(values, bucket.rows, own)
    new, moved = _apply_rule(plan, bucket, inferior, gather_columns(values, bucket.rows, partners),
                             pair_norms, None)
    changed[members] = np.add.reduceat(ops.convert_to_numpy(moved), bounds[members])
    scatter_columns([variables[m] for m in members], values, bucket.rows, own, new)
    return changed


def _apply_rule(plan, bucket, inferior, dominant, pair_norms, paired):
    """The bucket's rule on columns `(S, P)` and their partners' (or their
    summaries): the new columns, and how many values of each changed.

    The rules change a value only to a finite one (a non-finite result
    keeps the old value). The old value also stays where a result
    overflows the variables' dtype (a value that fits float32 may not fit a
    narrower one) and, if `paired` is given, in columns that are not
    paired."""
    # The rules take columns in filter layout, (S, 1, P).
    new = bucket.rule.apply(
        ops.expand_dims(ops.cast(inferior, plan.compute_dtype), 1),
        ops.expand_dims(ops.cast(dominant, plan.compute_dtype), 1),
        *pair_norms)
    new = ops.squeeze(new, 1)
    keep = paired
    if bucket.dtype != plan.compute_dtype:
        new = ops.cast(new, bucket.dtype)
        keep = ops.isfinite(new) if keep is None else ops.logical_and(ops.isfinite(new), keep)
    if keep is not None:
        new = ops.where(keep, new, inferior)
    return new, ops.sum(ops.cast(new != inferior, "int32"), axis=0)


# ---------------------------------------------------------------- host


def match(plan, item_scores, counts):
    """Forward matching in every tensor, `counts[t]` inferior items in
    tensor `t`, on the host: a `Matching` of NumPy arrays."""
    partner, paired = strategies.forward_pairs(item_scores, counts, plan.host_item_tensor, plan.sizes)
    shift = np.zeros(plan.count, "int32")
    inferior = np.flatnonzero(paired)
    shift[inferior] = partner[inferior] - inferior
    return Matching(paired, shift)


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
