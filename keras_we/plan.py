"""The static geometry of one model's evolution: which variables, items and
columns there are, and how they are laid side by side. Built once from the
targets' shapes; the step functions (`keras_we.steps`) read it.

Terms: a *tensor* is one evolvable variable (`t`), an *item* a filter or
BatchNorm entry (`i`, numbered across the plan), a *column* the `S` values
of one input channel of one item (see `keras_we.layouts`), a *group* the
selection pool (`"conv"`, `"gamma"`, `"beta"`) of its items.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_we.backend_utils import concatenate, index_tensor, reshape
from keras_we.layouts import GROUPS
from keras_we.strategies import threshold_position


# A crossover works on one bucket at a time and writes it before the next,
# so that a step holds a few copies of one bucket, never of the model
# (issue 12: at most 0.5x its weight bytes). A bucket's cost is its values'
# bytes plus `COLUMN_BYTES` per column (the per-column indices, partners and
# norms a crossover computes, which dominate for 1x1 kernels and vectors);
# it holds at most `BUCKET_FRACTION` of the plan's values' bytes (a tensor
# that costs more stands alone), but may always hold `MIN_BUCKET_BYTES`:
# each bucket is one call, which costs about a millisecond, and in a small
# model (ResNet-56: 3.3 MB) 5% would make some 30 calls of 0.16 MB each.
# Measured with `benchmarks/evolution_speed.py`; see README, "Speed".
BUCKET_FRACTION = 0.05
MIN_BUCKET_BYTES = 2**20
COLUMN_BYTES = 32


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Tensors that share a crossover rule, `S` and dtype, laid side by side.

    Each tensor's column view `(S, width)` concatenates into one `(S, M)`
    tensor, so one crossover call covers all of them. A column's partner
    sits at the same offset from it as its item's partner item, whatever the
    tensor's channel count. Tensors of the same rule, `S` and dtype fill
    several buckets when they hold more than `BUCKET_FRACTION` of the plan's
    bytes.
    """

    tensors: tuple  # plan indices of the member tensors
    rule: object  # the `crossovers.Rule` they take
    rows: int  # S (S * C where a column is a whole filter)
    dtype: str  # the members' variable dtype
    widths: tuple  # columns of each member
    column_items: object  # plan-wide item of each column (tensor)
    column_tensors: object  # index into `tensors` of each column (tensor)
    column_strides: object  # columns between an item's and the next item's
    # same channel, per column (tensor), or None where it is 1 throughout
    nbytes: int  # the members' values' bytes
    host_column_items: np.ndarray  # `column_items`, in NumPy
    host_strides: np.ndarray  # per column, its stride (NumPy)
    member_columns: tuple  # each member's `(start, end)` columns

    def columns(self, values, dtype):
        """The members' values as one `(S, M)` tensor, cast to `dtype`
        (`values[t]` is member `t`'s value)."""
        if self.rows == 1:  # vectors need no reshape: concatenate, then add the row
            flat = [values[t] if len(values[t].shape) == 1 else reshape(values[t], (-1,))
                    for t in self.tensors]
            columns = ops.expand_dims(concatenate(flat, 0), 0)
        else:
            columns = concatenate([reshape(values[t], (self.rows, -1)) for t in self.tensors], 1)
        return columns if dtype == self.dtype else ops.cast(columns, dtype)

    def split(self, columns, shapes):
        """The inverse of `columns`: one tensor per member, in its shape."""
        if self.rows == 1:
            columns = ops.squeeze(columns, 0)
        return [part if tuple(part.shape) == shapes[t] else reshape(part, shapes[t])
                for part, t in zip(self.split_flat(columns), self.tensors)]

    def split_flat(self, values):
        """Values along the last axis (one per column), as one part per member."""
        # Slices, which cost less dispatch than `ops.split` on PyTorch.
        return [values[..., start:end] for start, end in self.member_columns]


def _fill(tensors, costs, budget):
    """`tensors` in order, cut into runs that cost at most `budget` (a
    tensor that costs more alone)."""
    runs, run, total = [], [], 0
    for t in tensors:
        if run and total + costs[t] > budget:
            runs.append(run)
            run, total = [], 0
        run.append(t)
        total += costs[t]
    return runs + [run]


class Plan:
    """The tensors of a model's targets, group after group (conv kernels,
    gammas, betas; each in traversal order), and the index tensors that the
    step functions use, made once.

    Args:
        targets: `keras_we.layers.Target`s (a variable and its `Layout`).
        crossover: the `keras_we.crossovers.Crossover` mode.

    Attributes:
        order: target indices in plan order.
        shapes, dtypes, layouts: of each tensor, in plan order.
        sizes: items of each tensor; `count`, all items.
        nbytes: the tensors' bytes, all together.
        groups: the group names present, in plan order; `group_tensors[g]`
            the tensors of each, `group_items[g]` its `(start, end)` items.
        compute_dtype: the dtype scores and crossovers compute in.
        item_tensor, item_group, item_channels: per item (tensors; the
            indices int64 on PyTorch, see `index_tensor`);
            `host_item_tensor`, `item_tensor` in NumPy.
        buckets: the `Bucket`s, each crossed over (and written) on its own.
        entrywise: per tensor, whether it is a vector whose values are its
            items (a BatchNorm gamma or beta): its norms are its magnitudes.
        norm_rows: per tensor, the rows of the view whose column sums of
            magnitudes give its items' norms: for a channel-major tensor (a
            regular kernel, a vector) `S * C`, whose column sums are the
            items' norms, else `S` (the columns then add into items by
            `Layout.item_sums`).
    """

    def __init__(self, targets, crossover):
        self.groups = [g for g in GROUPS if any(t.group == g for t in targets)]
        self.order = sorted(range(len(targets)), key=lambda i: self.groups.index(targets[i].group))
        targets = [targets[i] for i in self.order]
        self.shapes = [tuple(t.variable.shape) for t in targets]
        self.dtypes = [keras.backend.standardize_dtype(t.variable.dtype) for t in targets]
        self.layouts = [t.layout for t in targets]
        self.sizes = [layout.items(s) for layout, s in zip(self.layouts, self.shapes)]
        self._check_layouts()
        self.count = sum(self.sizes)
        self.nbytes = sum(math.prod(s) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes))
        group_of = np.asarray([self.groups.index(t.group) for t in targets], "int32")
        self.group_tensors = [np.flatnonzero(group_of == g) for g in range(len(self.groups))]
        ends = np.cumsum([sum(self.sizes[t] for t in tensors) for tensors in self.group_tensors])
        self.group_items = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        # Scores accumulate in float32 at least, also for float16 variables.
        self.compute_dtype = "float64" if "float64" in self.dtypes else "float32"
        self.host_item_tensor = np.repeat(np.arange(len(targets), dtype="int32"), self.sizes)
        self.item_tensor = index_tensor(self.host_item_tensor)
        self.item_group = index_tensor(np.repeat(group_of, self.sizes))
        channels = [layout.channels(s) for layout, s in zip(self.layouts, self.shapes)]
        self.item_channels = ops.convert_to_tensor(np.repeat(channels, self.sizes), self.compute_dtype)
        self.buckets = self._buckets([crossover.rule(l, s) for l, s in zip(self.layouts, self.shapes)])
        self.norm_rows = [self._norm_rows(t) for t in range(len(self.shapes))]
        self.entrywise = [self._entrywise(t) for t in range(len(self.shapes))]

    def _buckets(self, rules):
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype("int32")
        views = [self._column_view(t, rule, starts[t]) for t, rule in enumerate(rules)]
        keyed = {}
        for t, (rows, items, stride) in enumerate(views):
            keyed.setdefault((rules[t], rows, self.dtypes[t]), []).append(t)
        nbytes = [math.prod(s) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes)]
        costs = [n + COLUMN_BYTES * len(items) for n, (rows, items, stride) in zip(nbytes, views)]
        budget = max(BUCKET_FRACTION * self.nbytes, MIN_BUCKET_BYTES)
        buckets = []
        for (rule, rows, dtype), members in keyed.items():
            for tensors in _fill(members, costs, budget):
                buckets.append(self._bucket(tensors, rule, rows, dtype, [views[t] for t in tensors]))
        return buckets

    def _column_view(self, t, rule, start):
        """`(rows, column_items, stride)` of tensor `t` in its bucket.

        A column is one input channel of one item (see `keras_we.layouts`),
        except for a rule that treats a filter's values alike
        (`rule.filterwise`) on a channel-major layout (channel `c` of item
        `o` at column `c * n + o`, as in a regular kernel): there
        `reshape(value, (S * C, n))` makes each column one whole item, so
        that a 1x1 kernel has one column per filter, not per value.
        """
        shape, layout, size = self.shapes[t], self.layouts[t], self.sizes[t]
        if rule.filterwise and self._channel_major(t):
            return math.prod(shape) // size, start + np.arange(size, dtype="int32"), 1
        return layout.rows(shape), start + layout.column_items(shape), self._strides[t]

    def _channel_major(self, t):
        """Whether channel `c` of item `o` is column `c * n + o` of tensor `t`."""
        columns = self.layouts[t].column_items(self.shapes[t])
        return bool((columns == np.arange(len(columns)) % self.sizes[t]).all())

    def _norm_rows(self, t):
        """The rows of the view of tensor `t` whose column sums of
        magnitudes give its items' norms (see `norm_rows`)."""
        shape = self.shapes[t]
        if self._channel_major(t):
            return math.prod(shape) // self.sizes[t]
        return self.layouts[t].rows(shape)

    def _entrywise(self, t):
        """Whether tensor `t` is a vector whose value `i` is its item `i`."""
        shape, layout = self.shapes[t], self.layouts[t]
        return (len(shape) == 1 and self.sizes[t] == shape[0] and layout.rows(shape) == 1
                and bool((layout.column_items(shape) == np.arange(shape[0])).all()))

    def _bucket(self, tensors, rule, rows, dtype, views):
        items = np.concatenate([view[1] for view in views]).astype("int32")
        widths = [len(view[1]) for view in views]
        strides = np.repeat([view[2] for view in views], widths).astype("int32")
        ends = np.cumsum(widths).tolist()
        return Bucket(
            tuple(tensors), rule, rows, dtype, tuple(widths),
            ops.convert_to_tensor(items),
            ops.convert_to_tensor(np.repeat(np.arange(len(tensors), dtype="int32"), widths)),
            None if (strides == 1).all() else ops.convert_to_tensor(strides),
            sum(math.prod(self.shapes[t]) * np.dtype(dtype).itemsize for t in tensors),
            items, strides, tuple(zip([0, *ends[:-1]], ends)),
        )

    def positions(self, ratios, finite=None):
        """Each group's global threshold position among the items of its
        finite tensors (all when `finite` is None): `floor(N * r)`, computed
        on the host (see `strategies.threshold_position`)."""
        positions = []
        for tensors, ratio in zip(self.group_tensors, ratios):
            count = sum(self.sizes[t] for t in tensors if finite is None or finite[t])
            positions.append(threshold_position(count, ratio) if count else 0)
        return positions

    def pairs(self, counts):
        """Inferior items that get a partner, per tensor."""
        return np.minimum(counts, np.asarray(self.sizes) - counts)

    def _check_layouts(self):
        """Checks each layout against its variable's shape, once, and finds
        each tensor's item stride.

        The crossover finds a column's partner (the same channel of the
        partner item) by an offset, so a layout must space items evenly:
        channel `j` of item `o` is column `first(j) + o * stride`.
        """
        self._strides = []
        for layout, shape, size in zip(self.layouts, self.shapes, self.sizes):
            columns = np.asarray(layout.column_items(shape))
            counts = np.bincount(columns, minlength=size) if columns.min(initial=0) >= 0 else None
            fits = (len(columns) * layout.rows(shape) == math.prod(shape) and counts is not None
                    and len(counts) == size and (counts == counts[0]).all())
            if fits:
                # positions[o, j]: the column of channel j of item o
                positions = np.argsort(columns, kind="stable").reshape(size, -1)
                stride = int(positions[1, 0] - positions[0, 0]) if size > 1 else 1
                fits = (positions - positions[0] == stride * np.arange(size)[:, None]).all()
            if not fits:
                raise ValueError(
                    f"{layout!r} does not fit a variable of shape {shape}: its "
                    f"{len(columns)} columns of {layout.rows(shape)} rows must hold the "
                    f"{math.prod(shape)} values, each of its {size} items the same "
                    "number of columns, evenly spaced (see keras_we.layouts)."
                )
            self._strides.append(stride)
