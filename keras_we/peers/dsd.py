"""`DSD`: dense - sparse - dense training (Han et al., ICLR 2017)."""

import base64
import math
import numbers

import numpy as np
from keras import ops

from keras_we.after_epoch import AfterEpochCallback
from keras_we.backend_utils import stable_argsort
from keras_we.peers.kernels import HeldZeros, conv_kernels, dense_kernels, is_finite
from keras_we.validation import check_real

STATE_FILE = "dsd_state.json"


class DSD(AfterEpochCallback):
    """Dense - sparse - dense training: prune the smallest weights for a
    while, then let them train again.

    DSD (Han et al., "DSD: Dense-Sparse-Dense Training for Deep Neural
    Networks", ICLR 2017) trains the network densely, then sets the
    smallest-magnitude weights of every layer to zero and trains the
    remaining ones with those held at zero (sparse), then lifts the mask
    and trains all weights again (dense), the pruned ones restarting from
    zero.

    **Pinned** for the paired protocol (PEERS.md): the same epochs and
    learning-rate schedule as the baseline (the paper retrains each phase
    with its own rates; here nothing but the mask changes). The three
    phases are thirds of `fit`'s `epochs` `E`: dense epochs
    `[0, round(E/3))`, sparse epochs `[round(E/3), round(2E/3))`, dense
    again up to `E` (200 epochs: sparse epochs 67 to 132). At the end of
    the first dense phase, in every trainable conv kernel (the kernels
    Weight Evolution evolves, `keras_we.peers.kernels.conv_kernels`) and
    every trainable `Dense` kernel separately, exactly
    `floor(sparsity * size)` values of smallest magnitude are set to zero
    (ties to the first in flat order: a stable sort of `|w|`). After every
    training batch of the sparse phase they are set to zero again, so the
    optimizer's momentum and weight decay cannot move them (its state is
    left alone; with `steps_per_execution=n`, after every `n` batches, as
    Keras calls batch callbacks). Biases, BatchNorm and frozen (`trainable=False`) variables
    are never pruned; a kernel holding a non-finite value is left dense.

    **When.** As for every `AfterEpochCallback`, the prune after epoch
    `round(E/3) - 1` and the lift after epoch `round(2E/3) - 1` run as the
    next epoch begins, never after the last epoch that ran. The mask is
    the callback's state: with a `backup_dir`, a run resumed by
    `keras.callbacks.BackupAndRestore` inside the sparse phase holds the
    same values at zero and ends with the same weights. (The mask is kept,
    not read back from the zeros: a kept weight can be exactly zero too.)

    **Published** (the authors' README, ImageNet top-1 error): ResNet-50
    24.01 -> 22.89, ResNet-18 30.43 -> 29.17.

    **Logs.** Each epoch adds `dsd_sparsity` (the fraction of the prunable
    values, all trainable conv and Dense kernels, held at zero during the
    epoch: 0 in the dense phases), `dsd_pruned_values` (values zeroed by
    the prune, in the first sparse epoch; 0 otherwise) and
    `dsd_skipped_nonfinite` (kernels the prune left dense because they hold
    a non-finite value).

    Example:

    ```python
    model.fit(
        x, y, epochs=200,
        callbacks=[keras_we.peers.DSD(sparsity=0.3), keras.callbacks.CSVLogger("log.csv")],
    )
    ```

    Args:
        sparsity: the fraction of each kernel's values pruned, in [0, 1).
            Defaults to 0.3.
        sparse_epochs: `(start, end)`, the 0-based sparse epochs
            `[start, end)`, integers with `1 <= start < end <= epochs`; or
            None for the middle third of `fit`'s `epochs` (which needs
            `epochs >= 3`). Defaults to None.
        verbose: 1 prints one line at the prune and at the lift. Defaults
            to 0.
        backup_dir: a folder where the callback keeps its mask after each
            epoch (`dsd_state.json`), so that a run resumed with
            `keras.callbacks.BackupAndRestore` holds the same values at
            zero. Defaults to None (no file).
    """

    state_file = STATE_FILE

    def __init__(self, sparsity=0.3, sparse_epochs=None, verbose=0, backup_dir=None):
        super().__init__(backup_dir=backup_dir, verbose=verbose)
        if _is_real(sparsity) and not 0 <= sparsity < 1:
            raise ValueError(f"`sparsity` must be a real number in [0, 1); got {sparsity!r}.")
        self.sparsity = check_real("sparsity", sparsity, minimum=0, maximum=1)
        self.sparse_epochs = _check_sparse_epochs(sparse_epochs)
        self.phase = self.sparse_epochs  # the sparse epochs `[start, end)` of this `fit`
        self.set_state(_dense_state(0))

    # ------------------------------------------------------------ schedule

    def on_train_begin(self, logs=None):
        self.phase = sparse_phase((self.params or {}).get("epochs"), self.sparse_epochs)
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch and epoch == 0:
            self.set_state(_dense_state(0))  # a new run starts dense
        super().on_epoch_begin(epoch, logs)

    def scheduled(self, epoch):
        start, end = self.phase
        return epoch in (start - 1, end - 1)

    def act(self, epoch):
        """Prunes after the last dense epoch, lifts the mask after the last
        sparse one (see `AfterEpochCallback`)."""
        if epoch == self.phase[0] - 1:
            return self._prune()
        self.set_state(_dense_state(self._state["prunable_values"]))
        return self.idle_logs()

    def idle_logs(self):
        return {"dsd_sparsity": self._held_fraction, "dsd_pruned_values": 0,
                "dsd_skipped_nonfinite": 0}

    # ------------------------------------------------------------ sparse phase

    def on_train_batch_end(self, batch, logs=None):
        if self._held is not None:
            self.write_after_batch(self._held.apply)

    def _prune(self):
        kernels = prunable_kernels(self.model)
        masks, skipped = {}, 0
        for index, variable in enumerate(kernels):
            value = variable.value
            if not is_finite(value):
                skipped += 1
                continue
            count = pruned_count(self.sparsity, _size(variable))
            masks[index] = ops.convert_to_numpy(keep_mask(value, count))
        self._hold(kernels, masks, sum(_size(v) for v in kernels))
        if self._held is not None:
            self._held.apply()
        pruned = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
        return {"dsd_sparsity": self._held_fraction, "dsd_pruned_values": pruned,
                "dsd_skipped_nonfinite": skipped}

    # ------------------------------------------------------------ state

    def get_state(self):
        """The mask held now, as a JSON-able dict: `prunable_values` and
        `masks`, one per pruned kernel: its place in `prunable_kernels`
        (paths change when Keras numbers layer names), its shape, and its
        0/1 keep mask as packed bits in base64 (none in the dense phases)."""
        return self._state

    def set_state(self, state):
        """Restores a mask saved by `get_state` (the model must be set when
        the mask is not empty)."""
        try:
            prunable = state["prunable_values"]
            saved = state["masks"]
        except (TypeError, KeyError):
            raise ValueError(f"Not a DSD state: {state!r}.") from None
        if not saved:
            self._hold([], {}, prunable)
            return
        kernels = prunable_kernels(self.model)
        masks = {}
        for entry in saved:
            index = entry["kernel"]
            if not 0 <= index < len(kernels):
                raise ValueError(f"The DSD state holds a mask for kernel {index}; the model "
                                 f"has {len(kernels)} trainable conv and Dense kernels.")
            masks[index] = _decode(entry, tuple(kernels[index].shape))
        self._hold(kernels, masks, prunable)

    def _hold(self, kernels, masks, prunable):
        """From now on holds `masks` (`{index in kernels: NumPy boolean
        array}`, True keeps) on those of `kernels`."""
        self._held = None
        if masks:
            variables = [kernels[index] for index in masks]
            casts = [ops.cast(mask, v.dtype) for v, mask in zip(variables, masks.values())]
            self._held = HeldZeros(variables, casts)
        zeros = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
        self._held_fraction = zeros / prunable if prunable else 0.0
        self._state = {"prunable_values": int(prunable),
                       "masks": [_encode(index, m) for index, m in masks.items()]}


def prunable_kernels(model):
    """The variables DSD prunes: trainable conv kernels, then trainable
    `Dense` kernels, in traversal order."""
    return [t.variable for t in conv_kernels(model)] + [v for _, v in dense_kernels(model)]


def pruned_count(sparsity, size):
    """`floor(sparsity * size)`, of the exact product (0.29 * 100 is 29,
    not 28.999999999999996)."""
    return math.floor(round(sparsity * size, 6))


def keep_mask(value, count):
    """A boolean tensor of `value`'s shape, False at its `count` values of
    smallest magnitude (ties: the first in flat order), True elsewhere."""
    order = stable_argsort(ops.reshape(ops.abs(value), (-1,)))
    rank = ops.argsort(order)  # each value's place in ascending |w| (a permutation: no ties)
    return ops.reshape(rank >= count, ops.shape(value))


def sparse_phase(epochs, sparse_epochs=None):
    """The sparse epochs `(start, end)` of a `fit` of `epochs` epochs:
    `sparse_epochs`, checked against `epochs`, or the middle third."""
    if sparse_epochs is None:
        if epochs is None:
            raise ValueError("With `sparse_epochs=None`, DSD takes the middle third of fit's "
                             "`epochs`, which this run does not give; pass `sparse_epochs`.")
        start, end = round(epochs / 3), round(2 * epochs / 3)
        if not 1 <= start < end:
            raise ValueError(f"`sparse_epochs=None` takes the middle third of fit's epochs, "
                             f"which is empty for epochs={epochs}: train 3 epochs or more, "
                             "or pass `sparse_epochs`.")
        return start, end
    if epochs is not None and sparse_epochs[1] > epochs:
        raise ValueError(f"`sparse_epochs` must end by fit's epochs={epochs}; "
                         f"got {sparse_epochs!r}.")
    return sparse_epochs


def _check_sparse_epochs(value):
    if value is None:
        return None
    message = (f"`sparse_epochs` must be None or (start, end), integers with "
               f"1 <= start < end; got {value!r}.")
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise TypeError(message)
    start, end = int(value[0]), int(value[1])
    if not 1 <= start < end:
        raise ValueError(message)
    return start, end


def _dense_state(prunable):
    return {"prunable_values": prunable, "masks": []}


def _encode(kernel, mask):
    bits = np.packbits(np.asarray(mask, bool).ravel())
    return {"kernel": kernel, "shape": list(mask.shape),
            "keep": base64.b64encode(bits.tobytes()).decode("ascii")}


def _decode(entry, shape):
    if tuple(entry["shape"]) != shape:
        raise ValueError(f"The DSD state holds a mask of shape {tuple(entry['shape'])} "
                         f"for a kernel of shape {shape}.")
    bits = np.frombuffer(base64.b64decode(entry["keep"]), np.uint8)
    return np.unpackbits(bits, count=math.prod(shape)).astype(bool).reshape(shape)


def _size(variable):
    return math.prod(variable.shape)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
