"""How an evolvable variable splits into items: the only code that knows
kernel geometry.

An *item* is what Weight Evolution ranks, pairs and rewrites: a conv filter
or a BatchNorm entry. A `Layout` says how a variable of a given shape holds
its items, through one view that every layout shares: the variable reshaped
row-major to `(S, width)`, `S` being its spatial positions (1 for a vector).
Each of the `width` *columns* holds the `S` values of one input channel of
one item, and `column_items` says which item; items must be evenly spaced
(channel `j` of item `o` at column `first(j) + o * stride`, which the
`Plan` checks). The steps work on columns only, so a new kind of variable
needs a new `Layout` and nothing else.

Three layouts cover Keras's layers (see `keras_we.layers`):

- `REGULAR_KERNEL`: a conv kernel `(*spatial, C, O)`, grouped ones
  included: `O` filters of `C` input channels; column `c * O + o` is
  channel `c` of filter `o`.
- `DEPTHWISE_KERNEL`: a depthwise kernel `(*spatial, C, M)`: `C * M`
  filters of one channel; column `c * M + m` is filter `c * M + m`.
- `GAMMA`, `BETA`: a BatchNorm vector of `O` entries, one column each.
"""

import math

import numpy as np
from keras import ops

from keras_we.backend_utils import reshape, segment_sum

GROUPS = ("conv", "gamma", "beta")


class Layout:
    """How a variable of some shape holds its items.

    Subclasses define `items`, `channels`, `spatial_shape` and
    `column_items`; `item_sums` has a general default that subclasses may
    make cheaper. All take the variable's shape (a tuple of ints).

    Attributes:
        group: the selection pool the items join: `"conv"` (filters, scored
            by L1 norm per input channel), `"gamma"` or `"beta"` (BatchNorm
            entries, scored by magnitude). Each pool has its own ratio and
            global threshold.
    """

    group = "conv"

    def items(self, shape):
        """The number of items."""
        raise NotImplementedError

    def channels(self, shape):
        """Input channels per item: a filter's score is its L1 norm over this."""
        raise NotImplementedError

    def spatial_shape(self, shape):
        """The spatial extent of one channel of an item, `()` for an entry.
        A crossover mode looks at it to choose filter or element crossover."""
        raise NotImplementedError

    def column_items(self, shape):
        """The item of each column of `reshape(value, (S, -1))`, as NumPy ints."""
        raise NotImplementedError

    @property
    def is_kernel(self):
        """Kernels take filter or element crossover; entries take their own."""
        return self.group == "conv"

    def rows(self, shape):
        """`S`, the rows of the column view."""
        return math.prod(self.spatial_shape(shape))

    def item_sums(self, column_sums, shape):
        """Per item, the sum of its columns' `column_sums` (one per column).
        This default gathers by `column_items`; a regular layout reshapes."""
        ids = ops.convert_to_tensor(self.column_items(shape), "int32")
        return segment_sum(column_sums, ids, self.items(shape))

    def filters(self, value):
        """`value` in filter layout `(S, C, O)`: `O` items of `C` channels, for
        inspecting or plotting (the steps use the column view)."""
        shape = tuple(value.shape)
        columns = ops.reshape(value, (self.rows(shape), -1))
        order = np.argsort(self.column_items(shape), kind="stable")
        grouped = ops.take(columns, ops.convert_to_tensor(order, "int32"), axis=1)
        filters = ops.reshape(grouped, (self.rows(shape), self.items(shape), -1))
        return ops.transpose(filters, (0, 2, 1))

    def from_filters(self, filters, shape):
        """The inverse of `filters`: a value of `shape` from its `(S, C, O)`
        filter layout."""
        shape = tuple(shape)
        grouped = ops.reshape(ops.transpose(filters, (0, 2, 1)), (self.rows(shape), -1))
        order = np.argsort(self.column_items(shape), kind="stable")
        inverse = ops.convert_to_tensor(np.argsort(order, kind="stable"), "int32")
        return ops.reshape(ops.take(grouped, inverse, axis=1), shape)

    def filter_rows(self, value):
        """`value` as a matrix of one row per item (filter), `(O, S * C)`:
        row `o` holds filter `o`'s values, channel by channel."""
        filters = self.filters(value)
        return ops.reshape(ops.transpose(filters, (2, 1, 0)), (filters.shape[2], -1))

    def from_filter_rows(self, rows, shape):
        """The inverse of `filter_rows`: a value of `shape` from its rows."""
        shape = tuple(shape)
        filters = ops.reshape(rows, (self.items(shape), -1, self.rows(shape)))
        return self.from_filters(ops.transpose(filters, (2, 1, 0)), shape)

    def __repr__(self):
        return type(self).__name__ + "()"


class RegularKernel(Layout):
    """A conv kernel `(*spatial, C, O)`: `O` filters of `C` channels."""

    def items(self, shape):
        return shape[-1]

    def channels(self, shape):
        return shape[-2]

    def spatial_shape(self, shape):
        return tuple(shape[:-2])

    def column_items(self, shape):
        return np.arange(shape[-2] * shape[-1], dtype="int32") % shape[-1]

    def item_sums(self, column_sums, shape):
        return ops.sum(reshape(column_sums, (shape[-2], shape[-1])), axis=0)


class DepthwiseKernel(Layout):
    """A depthwise kernel `(*spatial, C, M)`: `C * M` one-channel filters,
    filter `c * M + m` being `kernel[..., c, m]`."""

    def items(self, shape):
        return shape[-2] * shape[-1]

    def channels(self, shape):
        return 1

    def spatial_shape(self, shape):
        return tuple(shape[:-2])

    def column_items(self, shape):
        return np.arange(self.items(shape), dtype="int32")

    def item_sums(self, column_sums, shape):
        return column_sums


class Entries(Layout):
    """A BatchNorm vector: one item per entry."""

    def __init__(self, group):
        if group not in GROUPS[1:]:
            raise ValueError(f"`group` must be 'gamma' or 'beta'; got {group!r}.")
        self.group = group

    def items(self, shape):
        return shape[-1]

    def channels(self, shape):
        return 1

    def spatial_shape(self, shape):
        return ()

    def column_items(self, shape):
        return np.arange(shape[-1], dtype="int32")

    def item_sums(self, column_sums, shape):
        return column_sums

    def __repr__(self):
        return f"Entries({self.group!r})"


REGULAR_KERNEL = RegularKernel()
DEPTHWISE_KERNEL = DepthwiseKernel()
GAMMA = Entries("gamma")
BETA = Entries("beta")
