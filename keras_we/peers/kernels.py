"""What the peer methods share: the kernels they touch, filter norms, and
values held at zero between batches.

"Conv kernels" are the kernels Weight Evolution evolves (its layer registry,
`keras_we.layers`): Conv1D/2D/3D, DepthwiseConv, both kernels of
SeparableConv and any registered layer's kernels; trainable ones only, so a
frozen layer is never written. A *filter* is one item of its `Layout` (an
output channel), seen as one row of `layout.filter_rows(value)`.
"""

import keras
from keras import ops

from keras_we.backend_utils import variable_function
from keras_we.layers import find_targets, walk_layers


def conv_kernels(model):
    """The model's trainable conv kernels, as `keras_we.layers.Target`s in
    traversal order (BatchNorm vectors left out)."""
    return [target for target in find_targets(model) if target.layout.is_kernel]


def dense_kernels(model):
    """The kernels of the model's trainable `Dense` layers (and subclasses),
    as `(layer, variable)` pairs in traversal order."""
    trainable = {id(v) for v in model.trainable_variables}
    found = []
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.Dense) and layer.built:
            # A LoRA-enabled layer's `kernel` is computed; its variable is `_kernel`.
            kernel = getattr(layer, "_kernel", None)
            if kernel is not None and id(kernel) in trainable:
                found.append((layer, kernel))
    return found


def l1_norms(target, value=None):
    """Each filter's L1 norm over all its `spatial * in` values, `(O,)`."""
    value = target.variable.value if value is None else value
    return ops.sum(ops.abs(target.layout.filter_rows(value)), axis=1)


def is_finite(value):
    """Whether every value of a tensor is finite, as a Python bool."""
    return bool(ops.convert_to_numpy(ops.all(ops.isfinite(value))))


class HeldZeros:
    """Holds chosen values of some variables at zero: `apply()` zeroes each
    variable where its 0/1 mask is 0, compiled once (after every training batch,
    so the optimizer's momentum and weight decay cannot move them).

    Args:
        variables: the variables.
        masks: one 0/1 array per variable, of its shape (1 keeps a value).
    """

    def __init__(self, variables, masks):
        self.variables = list(variables)
        self.masks = [ops.convert_to_tensor(m, v.dtype) for v, m in zip(self.variables, masks)]
        masks = self.masks
        # `where`, not a product: a held value that overflowed to inf in
        # the last batch becomes 0, not `inf * 0 = NaN`.
        self._apply = variable_function(
            lambda values: ([ops.where(mask > 0, value, ops.zeros_like(value))
                             for value, mask in zip(values, masks)], ()),
            self.variables, writes=True)

    def apply(self):
        if self.variables:
            self._apply()
