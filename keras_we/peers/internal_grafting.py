"""`InternalGrafting`: filter grafting's single-network internal variant."""

import numpy as np
from keras import ops

from keras_we.after_epoch import AfterEpochCallback
from keras_we.backend_utils import stable_argsort
from keras_we.peers.kernels import conv_kernels, is_finite, l1_norms
from keras_we.validation import check_real


def graft_inside(rows, norms, threshold):
    """One kernel's internal grafting, as the public code's sequential loop
    computes it, in closed form.

    With the `n` filters (`rows`, `(n, spatial * in)`) ranked by L1 norm
    (`norms`) ascending as `order` and `m` of them below `threshold`, the
    loop `for j: order[j] += order[n-1-j]` (in place, while `order[j]` is
    weak) gives, for `j < m`,
    `new[order[j]] = orig[order[j]] * (1 + [j > n-1-j]) + orig[order[n-1-j]]`:
    past the middle the donor was itself grafted (it received
    `orig[order[j]]`), and for odd `n` the middle filter adds itself.

    Returns the new rows and `m`.
    """
    n = rows.shape[0]
    order = stable_argsort(norms)
    ranked = ops.take(rows, order, axis=0)
    weak = ops.take(norms, order) < threshold  # the first m ranks
    j = np.arange(n)
    twice = ops.convert_to_tensor((1 + (j > n - 1 - j))[:, None], rows.dtype)
    grafted = ops.where(weak[:, None], ranked * twice + ops.flip(ranked, axis=0), ranked)
    return ops.take(grafted, ops.argsort(order), axis=0), ops.sum(ops.cast(weak, "int32"))


class InternalGrafting(AfterEpochCallback):
    """Grafts each conv layer's strongest filters onto its weakest after
    each epoch.

    The internal variant of filter grafting (Meng et al., CVPR 2020), as in
    the first version of the public code (`fxmeng/filter-grafting`, commit
    `cfa3611`, `grafting_cifar/grafting.py`, `inside()`): after each epoch,
    in each conv kernel, the filters are ranked by L1 norm (over all their
    `spatial * in` values) ascending as `order`; for `j = 0, 1, ...`, while
    filter `order[j]` is below `threshold`, filter `order[n-1-j]` (the
    `j`-th strongest) is added to it, in place, one after the other; the
    first filter at or above the threshold ends the kernel. A weak filter
    so takes the values of a strong one and trains on. Cost: one pass over
    the conv kernels per epoch, like Weight Evolution.

    **Pinned choices.**
    - The public code's sequential, in-place semantics are kept exactly,
      computed in closed form (`graft_inside`): when more than half the
      filters are weak, a donor past the middle was itself grafted first,
      and for odd `n` the middle filter adds itself (doubles).
    - Ties in L1 norm rank in filter index order (a stable sort;
      `torch.argsort` in the public code is not stable).
    - Which kernels: the conv kernels Weight Evolution evolves
      (`keras_we.peers.kernels.conv_kernels`: Conv1D/2D/3D, DepthwiseConv,
      both SeparableConv kernels; trainable ones only, so a frozen layer is
      never written). The public code takes the state-dict entries named
      `conv`. A depthwise kernel is `C * M` filters of one channel each
      (through its layout), grafted among themselves, as the public
      MobileNetV2's `(C, 1, k, k)` depthwise weights are.
    - Weak means L1 norm strictly below `threshold`, as in the public code.
    - When: as epoch `e + 1` begins (`AfterEpochCallback`), so never after
      the last epoch. The public code also grafts after its last epoch,
      after testing and saving it, so its reported accuracy is the same.
    - A kernel holding a NaN or infinite value (or that grafting would
      overflow) is left alone and counted.

    **Logs.** Each epoch logs what the grafting before it did (zeros for
    epoch 0): `graft_internal_filters` (filters that received a donor) and
    `graft_internal_skipped_nonfinite` (kernels left alone for non-finite
    values).

    Example:

    ```python
    model.fit(x, y, epochs=200, callbacks=[keras_we.peers.InternalGrafting()])
    ```

    Args:
        threshold: a filter whose L1 norm is below it is weak; a real
            number >= 0. Defaults to 0.1 (the public code's default).
        verbose: 1 prints one line per grafting. Defaults to 0.
    """

    def __init__(self, threshold=0.1, verbose=0):
        super().__init__(verbose=verbose)
        self.threshold = check_real("threshold", threshold, minimum=0)

    def act(self, epoch):
        """Grafts the weak filters after `epoch` (see `AfterEpochCallback`)."""
        filters = skipped = 0
        for target in conv_kernels(self.model):
            value = target.variable.value
            rows = target.layout.filter_rows(value)
            new, count = graft_inside(rows, l1_norms(target, value), self.threshold)
            # A non-finite value is in no weak filter (its norm is not
            # below the threshold), so it is still in `new`.
            if not is_finite(new):
                skipped += 1
                continue
            count = int(ops.convert_to_numpy(count))
            if count:
                target.variable.assign(target.layout.from_filter_rows(new, value.shape))
                filters += count
        return {"graft_internal_filters": filters, "graft_internal_skipped_nonfinite": skipped}

    def idle_logs(self):
        return {"graft_internal_filters": 0, "graft_internal_skipped_nonfinite": 0}
