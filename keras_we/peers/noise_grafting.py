"""`NoiseGrafting`: filter grafting's single-network noise variant."""

import keras
import numpy as np
from keras import ops

from keras_we.after_epoch import AfterEpochCallback
from keras_we.peers.kernels import conv_kernels, is_finite, l1_norms
from keras_we.validation import check_int, check_real


def noise_seed(seed, epoch, index):
    """The integer seed of the noise for conv kernel `index` after `epoch`,
    derived from the callback's `seed` (NumPy's `SeedSequence`)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class NoiseGrafting(AfterEpochCallback):
    """Adds decaying Gaussian noise to weak conv filters after each epoch.

    The noise variant of filter grafting (Meng et al., CVPR 2020), as in the
    first version of the public code (`fxmeng/filter-grafting`, commit
    `cfa3611`, `grafting_cifar/grafting.py`, `noise()`): after epoch `e`
    (0-based), every conv filter whose L1 norm over all its `spatial * in`
    values is below `threshold` gets `N(0, 1) * decay ** e` added to each of
    its values, so that a dead filter is pushed back into training with
    noise that fades over the run. Other filters are left exactly as they
    are. Cost: one pass over the conv kernels per epoch, like Weight
    Evolution.

    **Pinned choices.**
    - Which kernels: the conv kernels Weight Evolution evolves
      (`keras_we.peers.kernels.conv_kernels`: Conv1D/2D/3D, DepthwiseConv,
      both SeparableConv kernels; trainable ones only, so a frozen layer is
      never written). The public code takes the state-dict entries named
      `conv`. A depthwise kernel is `C * M` filters of one channel each
      (through its layout), as the public MobileNetV2's `(C, 1, k, k)`
      depthwise weights are.
    - Weak means L1 norm strictly below `threshold`, as in the public code.
    - The noise is `keras.random.normal` of shape `(filters, spatial * in)`
      (row `o` for filter `o`, as `layout.filter_rows` orders it), drawn
      with a stateless integer seed derived from (`seed`, `e`, the kernel's
      index among the conv kernels) (`noise_seed`): a run is reproducible,
      and a resumed run draws the same noise without any saved state (it
      is not the public code's `torch.randn_like` stream, and differs
      between backends).
    - When: as epoch `e + 1` begins (`AfterEpochCallback`), so never after
      the last epoch. The public code also adds noise after its last epoch,
      after testing and saving it, so its reported accuracy is the same.
    - A kernel holding a NaN or infinite value is left alone and counted.

    **Logs.** Each epoch logs what the grafting before it did (zeros for
    epoch 0): `graft_noise_filters` (filters that got noise),
    `graft_noise_scale` (`decay ** e`) and `graft_noise_skipped_nonfinite`
    (kernels left alone for non-finite values).

    Example:

    ```python
    model.fit(x, y, epochs=200, callbacks=[keras_we.peers.NoiseGrafting(seed=1)])
    ```

    Args:
        threshold: a filter whose L1 norm is below it is weak; a real
            number >= 0. Defaults to 0.1 (the public code's default).
        decay: the noise after epoch `e` has standard deviation
            `decay ** e`; in (0, 1]. Defaults to 0.975 (the public code's).
        seed: an integer >= 0 from which every epoch's noise is derived, or
            None to draw one with NumPy now (pass one to resume a run
            exactly). Defaults to None.
        verbose: 1 prints one line per grafting. Defaults to 0.
    """

    def __init__(self, threshold=0.1, decay=0.975, seed=None, verbose=0):
        super().__init__(verbose=verbose)
        self.threshold = check_real("threshold", threshold, minimum=0)
        self.decay = check_real("decay", decay)
        if not 0 < self.decay <= 1:
            raise ValueError(f"`decay` must be a real number in (0, 1]; got {decay!r}.")
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        self.seed = check_int("seed", seed, minimum=0)

    def act(self, epoch):
        """Adds noise to the weak filters after `epoch` (see `AfterEpochCallback`)."""
        scale = self.decay**epoch
        filters = skipped = 0
        for index, target in enumerate(conv_kernels(self.model)):
            value = target.variable.value
            weak = l1_norms(target, value) < self.threshold
            rows = target.layout.filter_rows(value)
            noise = keras.random.normal(
                tuple(rows.shape), dtype=target.variable.dtype,
                seed=noise_seed(self.seed, epoch, index))
            new = ops.where(weak[:, None], rows + noise * scale, rows)
            # A non-finite value is in no weak filter (its norm is not
            # below the threshold), so it is still in `new`.
            if not is_finite(new):
                skipped += 1
                continue
            count = int(ops.convert_to_numpy(ops.sum(ops.cast(weak, "int32"))))
            if count:
                target.variable.assign(target.layout.from_filter_rows(new, value.shape))
                filters += count
        return {
            "graft_noise_filters": filters,
            "graft_noise_scale": scale,
            "graft_noise_skipped_nonfinite": skipped,
        }

    def idle_logs(self):
        return {"graft_noise_filters": 0, "graft_noise_scale": 0.0,
                "graft_noise_skipped_nonfinite": 0}
