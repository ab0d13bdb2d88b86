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

from keras_we.layouts import GROUPS
from keras_we.strategies import threshold_position


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Tensors that share a crossover rule, `S` and dtype, laid side by side.

    Each tensor's column view `(S, width)` concatenates into one `(S, M)`
    tensor, so one crossover call covers all of them. A column's partner
    sits at the same offset from it as its item's partner item, whatever the
    tensor's channel count.
    """

    tensors: tuple  # plan indices of the member tensors
    rule: object  # the `crossovers.Rule` they take
    rows: int  # S
    dtype: str  # the members' variable dtype
    widths: tuple  # columns of each member
    column_items: object  # plan-wide item of each column (tensor)
    column_tensors: object  # index into `tensors` of each column (tensor)
    column_strides: object  # columns between an item's and the next item's
    # same channel, per column (tensor), or None where it is 1 throughout

    def columns(self, values, dtype):
        """The members' values as one `(S, M)` tensor, cast to `dtype`."""
        if self.rows == 1:  # vectors need no reshape: concatenate, then add the row
            flat = [values[t] if len(values[t].shape) == 1 else ops.reshape(values[t], (-1,))
                    for t in self.tensors]
            columns = ops.expand_dims(concatenate(flat, 0), 0)
        else:
            columns = concatenate([ops.reshape(values[t], (self.rows, -1)) for t in self.tensors], 1)
        return columns if dtype == self.dtype else ops.cast(columns, dtype)

    def split(self, columns, shapes):
        """The inverse of `columns`: one tensor per member, in its shape."""
        if self.rows == 1:
            columns = ops.squeeze(columns, 0)
        return [part if tuple(part.shape) == shapes[t] else ops.reshape(part, shapes[t])
                for part, t in zip(self.split_flat(columns), self.tensors)]

    def split_flat(self, values):
        """Values along the last axis (one per column), as one part per member."""
        ends = np.cumsum(self.widths).tolist()
        # Slices, which cost less dispatch than `ops.split` on PyTorch.
        return [values[..., start:end] for start, end in zip([0, *ends[:-1]], ends)]


def concatenate(tensors, axis):
    return ops.concatenate(tensors, axis=axis) if len(tensors) > 1 else tensors[0]


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
        groups: the group names present, in plan order; `group_tensors[g]`
            the tensors of each, `group_items[g]` its `(start, end)` items.
        compute_dtype: the dtype scores and crossovers compute in.
        item_tensor, item_group, item_channels, item_ids: per item (tensors).
        buckets: the `Bucket`s, and per column of all of them in order,
            `column_items`; per bucket member, `bucket_tensors`.
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
        group_of = np.asarray([self.groups.index(t.group) for t in targets], "int32")
        self.group_tensors = [np.flatnonzero(group_of == g) for g in range(len(self.groups))]
        ends = np.cumsum([sum(self.sizes[t] for t in tensors) for tensors in self.group_tensors])
        self.group_items = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        # Scores accumulate in float32 at least, also for float16 variables.
        self.compute_dtype = "float64" if "float64" in self.dtypes else "float32"
        self.item_tensor = ops.convert_to_tensor(
            np.repeat(np.arange(len(targets), dtype="int32"), self.sizes))
        self.item_group = ops.convert_to_tensor(np.repeat(group_of, self.sizes))
        channels = [layout.channels(s) for layout, s in zip(self.layouts, self.shapes)]
        self.item_channels = ops.convert_to_tensor(np.repeat(channels, self.sizes), self.compute_dtype)
        self.item_ids = ops.convert_to_tensor(np.arange(self.count, dtype="int32"))
        self.buckets = self._buckets([crossover.rule(l, s) for l, s in zip(self.layouts, self.shapes)])
        self.column_items = ops.concatenate([b.column_items for b in self.buckets])
        self.bucket_tensors = ops.convert_to_tensor(
            np.concatenate([b.tensors for b in self.buckets]).astype("int32"))

    def _buckets(self, rules):
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype("int32")
        keyed = {}
        for t, (shape, layout) in enumerate(zip(self.shapes, self.layouts)):
            keyed.setdefault((rules[t], layout.rows(shape), self.dtypes[t]), []).append(t)
        buckets = []
        for (rule, rows, dtype), tensors in keyed.items():
            items = [starts[t] + self.layouts[t].column_items(self.shapes[t]) for t in tensors]
            widths = [len(i) for i in items]
            strides = np.repeat([self._strides[t] for t in tensors], widths).astype("int32")
            buckets.append(Bucket(
                tuple(tensors), rule, rows, dtype, tuple(widths),
                ops.convert_to_tensor(np.concatenate(items).astype("int32")),
                ops.convert_to_tensor(np.repeat(np.arange(len(tensors), dtype="int32"), widths)),
                None if (strides == 1).all() else ops.convert_to_tensor(strides),
            ))
        return buckets

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
