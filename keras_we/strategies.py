"""The four strategies of Weight Evolution, as pure functions over tensors.

Global selection, local selection, forward matching and crossover, in the
terms of Lin et al., "Weight Evolution" (ACM MM 2021) and of `SPEC.md`.
Every function takes and returns backend tensors and uses `keras.ops` only,
so the same code runs eagerly, under `jax.jit` and inside `tf.function`;
but for the two that run on the host, between compiled calls, on a few
numbers per layer: `inferior_count` (Python ints) and `forward_pairs`
(NumPy).

Crossovers take paired filters in *filter layout* `(S, C, P)`: `S` spatial
positions in row-major order, `C` input channels of one filter and `P`
pairs (see `keras_we.layouts`). BatchNorm gamma and beta are plain vectors.
The crossover modes' element formulas live in `keras_we.crossovers`.
"""

import math

import numpy as np
from keras import ops

from keras_we.backend_utils import first_extreme, segment_max, segment_sum, take

# ---------------------------------------------------------------- scores


def filter_norms(filters):
    """L1 norm of each filter."""
    return ops.sum(ops.abs(filters), axis=(0, 1))


def filter_scores(filters):
    """L1 norm of each filter divided by its number of input channels."""
    return filter_norms(filters) / filters.shape[1]


def entry_scores(values):
    """Score of BatchNorm entries: their magnitude."""
    return ops.abs(values)


# ------------------------------------------------------ global selection


def threshold_position(count, ratio):
    """Index of the global threshold among `count` ascending scores.

    `floor(count * ratio)`, clamped to the last item. Computed on the host
    in float64 so that it matches the public code exactly; a float32 product
    can land on the wrong side of an integer.
    """
    return min(int(math.floor(count * float(ratio))), count - 1)


def global_threshold(scores, position):
    """Global selection: the score at `position` of all scores, ascending.

    Items scoring at least this threshold are *globally important*.
    """
    return ops.take(ops.sort(scores), position)


# ------------------------------------------------------- local selection


def local_counts(scores, threshold, local_ratio, layer_ids=None, layers=1):
    """Local selection counts, per layer.

    Several layers may be scored together: `scores` then concatenates their
    items and `layer_ids` gives each item's layer, `0 .. layers - 1`.

    Returns:
        `(important, weak)`, two int vectors of length `layers`: the number
        of globally important items (`score >= threshold`) and of locally weak
        ones (`score <= local_ratio * best score of the layer`).
    """
    if layer_ids is None:
        layer_ids = ops.zeros(scores.shape, "int32")
    best = segment_max(scores, layer_ids, layers)
    weak = scores <= local_ratio * take(best, layer_ids)
    important = scores >= threshold
    return (
        segment_sum(ops.cast(important, "int32"), layer_ids, layers),
        segment_sum(ops.cast(weak, "int32"), layer_ids, layers),
    )


def inferior_count(size, important, weak, counter, starvation_limit):
    """How many of a layer's items are inferior, and the updated counter.

    A layer whose items are all globally important is left alone and does
    not touch the counter. Otherwise a layer with no locally weak item is
    *starved*: the counter grows, and once it reaches `starvation_limit`
    (the integer ceiling of `K / force_divisor`) one item is evolved anyway
    and the counter restarts. A layer with weak items resets the counter.
    This is scalar bookkeeping, carried from layer to layer on the host.

    Args:
        size: number of items `n` in the layer.
        important: globally important items `g`.
        weak: locally weak items `L`.
        counter: starvation counter carried from the previous layer.
        starvation_limit: the counter value that forces an evolution.

    Returns:
        `(k, counter)` with `k = min(L, n - g)` after forcing, as ints.
    """
    size, important, weak, counter = int(size), int(important), int(weak), int(counter)
    if important == size:
        return 0, counter
    if weak == 0:
        counter += 1
        if counter >= starvation_limit:
            weak, counter = 1, 0
    else:
        counter = 0
    return min(weak, size - important), counter


# ------------------------------------------------------ forward matching


def forward_pairs(scores, counts, layer_ids=None, sizes=None):
    """Forward matching: pairs the best dominant item with the best inferior.

    Within a layer of `n` items ranked by descending score (ties in index
    order), the last `k` are inferior and the rest dominant; the dominant
    item of rank `i` is paired with the inferior one of rank `n - k + i`,
    for `i < min(k, n - k)`.

    Several layers may be matched at once, each within itself: `scores`
    concatenates them in order, `layer_ids` gives each item's layer,
    `sizes` (Python ints) each layer's `n` and `counts` each layer's `k`.
    With `layer_ids=None` all items form one layer and `counts` is its `k`.

    Matching runs on the host, in NumPy, like the starvation counter that
    gives `counts`: a model has a few thousand items, which NumPy ranks in
    less time than one compiled call takes to start. Tensors are accepted.

    Returns:
        `(partner, paired)`, NumPy arrays: for every item, the index of its
        dominant partner and whether it is an inferior item that has one.
        `partner` is meaningful only where `paired` is true.
    """
    scores = np.asarray(ops.convert_to_numpy(scores))
    counts = np.asarray(ops.convert_to_numpy(counts), "int64").reshape(-1)
    if layer_ids is None:
        layer_ids, sizes = np.zeros(scores.shape, "int32"), (scores.shape[0],)
    sizes = np.asarray(sizes, "int64")
    # Best first within each layer, ties in index order: `lexsort` is
    # stable and sorts by its last key first. Sorted positions keep the
    # layers where the items are: a layer's are `start .. start + n - 1`.
    order = np.lexsort((-scores, np.asarray(ops.convert_to_numpy(layer_ids))))
    # The pairs alone, layer by layer (never one array per item beside
    # `order`: a MobileNetV2 has 50,000 items): positions `start + i` and
    # `start + n - k + i` for `i < min(k, n - k)`.
    pairs = np.maximum(np.minimum(counts, sizes - counts), 0)
    run = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    starts = np.repeat(np.cumsum(sizes) - sizes, pairs)
    inferior = order[starts + np.repeat(sizes - counts, pairs) + run]
    partner = np.zeros(scores.shape, "int64")
    partner[inferior] = order[starts + run]
    paired = np.zeros(scores.shape, bool)
    paired[inferior] = True
    return partner, paired


# -------------------------------------------------------------- crossover


def blend(x, y, weight_x, weight_y):
    """`a * x + (1 - a) * y` with `a = weight_x / (weight_x + weight_y)`.

    Returns the blend and where it is valid: a zero denominator or a
    non-finite result (the public code writes NaN or inf there) is invalid
    and callers keep the old value.

    A zero denominator needs no test of its own: `a` is then NaN (0 / 0)
    or infinite, and so is the blend (`inf * x + (1 - inf) * y` is never
    finite, whatever `x` and `y`), so that `isfinite` rules it out.
    """
    a = weight_x / (weight_x + weight_y)
    mixed = a * x + (1 - a) * y
    return mixed, ops.isfinite(mixed)


def entry_crossover(inferior, dominant):
    """Crossover of BatchNorm entries: `J <- a*J + (1-a)*D`, `a = |J|/(|J|+|D|)`.

    `inferior` and `dominant` hold the paired entries `J` and `D`, pair by
    pair; returns the new `J`.
    """
    mixed, valid = blend(inferior, dominant, ops.abs(inferior), ops.abs(dominant))
    return ops.where(valid, mixed, inferior)


def filter_crossover(inferior, dominant, inferior_norms=None, dominant_norms=None):
    """Crossover of whole filters: `J <- a*J + (1-a)*D`, `a = L1(J)/(L1(J)+L1(D))`.

    `inferior` and `dominant` hold the paired filters in filter layout
    `(S, C, P)`, pair `p` being `inferior[..., p]` and `dominant[..., p]`;
    returns the new inferior filters. The L1 norms are computed from them
    unless given: a caller that splits filters into parts, e.g. one per
    input channel, passes each part its whole filter's norm.
    """
    if inferior_norms is None:
        inferior_norms = filter_norms(inferior)
    if dominant_norms is None:
        dominant_norms = filter_norms(dominant)
    mixed, valid = blend(inferior, dominant, inferior_norms, dominant_norms)
    return ops.where(valid, mixed, inferior)


def element_crossover(inferior, dominant, element):
    """Crossover of single elements, one per input channel of each filter.

    `inferior` and `dominant` hold the paired filters in filter layout
    `(S, C, P)`. For each channel, `l` is the dominant filter's element of
    largest magnitude and `s` the inferior filter's element of smallest
    magnitude (the first in row-major order on ties). Every element of the
    inferior channel equal to `s` becomes `element(s, l)`, the crossover
    mode's formula (see `keras_we.crossovers`), where that is valid and
    finite (a mode's formula may return NaN or inf: the old value stays).

    Returns the new inferior filters.
    """
    largest = first_extreme(dominant, largest=True)
    smallest = first_extreme(inferior, largest=False)
    value, valid = element(smallest, largest)
    # Checked per channel, not per element of the filters.
    valid = ops.logical_and(valid, ops.isfinite(value))
    replace = ops.logical_and(inferior == smallest, valid)
    return ops.where(replace, value, inferior)


def largest_elements(filters):
    """Per channel of each filter, its first element of largest magnitude,
    as filters of one spatial position, `(1, C, P)`: all that
    `element_crossover` reads of its dominant filters."""
    return ops.expand_dims(first_extreme(filters, largest=True), 0)
