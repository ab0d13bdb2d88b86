"""The `WeightEvolution` Keras callback."""

import inspect
import json
import os
import warnings

import keras

from keras_we.evolution import (
    EvolutionOptions,
    EvolutionReport,
    Evolver,
    check_state,
    initial_state,
)
from keras_we.validation import check_int

STATE_FILE = "weight_evolution_state.json"
KEPT_STATES = 3


class WeightEvolution(keras.callbacks.Callback):
    """Evolves inferior conv filters and BatchNorm entries after each epoch.

    Weight Evolution (Lin et al., ACM MM 2021) keeps every filter of a
    network useful. After an epoch it ranks all conv filters by L1 norm per
    input channel and all BatchNorm gammas and betas by magnitude (global
    selection), finds in each layer the filters that are both globally
    unimportant and weak next to the layer's best (local selection), pairs
    the best of those with the best dominant filters of the same layer
    (forward matching), and rewrites the weakest elements of each inferior
    filter from its partner (crossover). Nothing is pruned: the rewritten
    filters train on. It helps lightweight networks most.

    The number of items considered grows within each learning-rate segment
    through `schedule`; starved layers (nothing weak in them) are forced to
    evolve one filter every `K / force_divisor` layers, `K` being the
    number of conv kernels.

    Each epoch adds to `logs` the items evolved (`we_conv_evolved`,
    `we_gamma_evolved`, `we_beta_evolved`), the ratios used
    (`we_conv_ratio`, ...), `we_changed_elements` and
    `we_skipped_nonfinite`, so `History`, `CSVLogger` and `TensorBoard`
    record them; place `WeightEvolution` before those callbacks, and before
    `BackupAndRestore` and `ModelCheckpoint` so that they save the evolved
    weights.

    Example:

    ```python
    model.fit(
        x, y, epochs=200,
        callbacks=[keras_we.WeightEvolution(), keras.callbacks.CSVLogger("log.csv")],
    )
    ```

    Args:
        conv_ratio: base fraction of all conv filters under the global
            threshold, in [0, 1]. Defaults to 0.2.
        gamma_ratio: the same for BatchNorm gammas. Defaults to 0.05.
        beta_ratio: the same for BatchNorm betas. Defaults to 0.05.
        local_ratio: a layer's items scoring at most this fraction of the
            layer's best are locally weak, in [0, 1]. Defaults to 0.1.
        force_divisor: a starved layer is forced to evolve one item after
            `K / force_divisor` consecutive starved layers; > 0. Defaults to 2.
        schedule: callable `epoch -> multiplier` of the three ratios. Defaults
            to `None`, the paper's CIFAR `PaperSchedule()`; for short runs use
            `PaperSchedule().scaled(epochs)`.
        crossover: `"paper"` (the paper's Fig. 1: the weakest element moves
            towards the dominant filter's strongest) or `"reference"` (what
            the public code computes, with which the paper's results were
            obtained). Defaults to `"reference"`: in paired CPU runs it ended
            at least as accurate as `"paper"` at every seed (README).
        frequency: evolve every `frequency` epochs, counted from
            `start_epoch`. Defaults to 1.
        start_epoch: first 0-based epoch after which to evolve. Defaults to 0.
        evolve_last_epoch: also evolve after the final epoch of `fit`, as
            the public code does; the returned model then holds rewritten
            filters that never trained. Defaults to False.
        backup_dir: a folder where the callback keeps its state after each
            epoch, so that a run resumed with
            `keras.callbacks.BackupAndRestore` continues with the same
            starvation counters. Defaults to None (no file).
        verbose: 1 prints one line per evolution. Defaults to 0.
    """

    def __init__(
        self,
        conv_ratio=0.2,
        gamma_ratio=0.05,
        beta_ratio=0.05,
        local_ratio=0.1,
        force_divisor=2,
        schedule=None,
        crossover="reference",
        frequency=1,
        start_epoch=0,
        evolve_last_epoch=False,
        backup_dir=None,
        verbose=0,
    ):
        super().__init__()
        self.options = EvolutionOptions(
            conv_ratio=conv_ratio,
            gamma_ratio=gamma_ratio,
            beta_ratio=beta_ratio,
            local_ratio=local_ratio,
            force_divisor=force_divisor,
            schedule=schedule,
            crossover=crossover,
        )
        self.frequency = check_int("frequency", frequency, minimum=1)
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        if not isinstance(evolve_last_epoch, bool):
            raise TypeError(
                f"`evolve_last_epoch` must be True or False; got {evolve_last_epoch!r}."
            )
        self.evolve_last_epoch = evolve_last_epoch
        if backup_dir is not None and not isinstance(backup_dir, (str, os.PathLike)):
            raise TypeError(
                f"`backup_dir` must be None or a folder path; got {backup_dir!r}."
            )
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        self.verbose = check_int("verbose", verbose, minimum=0)
        self._state = initial_state()
        self._saved_states = {}
        self._first_epoch = True
        self._evolver = None

    # ------------------------------------------------------------ state

    def get_state(self):
        """The starvation counters carried across epochs, as a JSON-able dict."""
        return dict(self._state)

    def set_state(self, state):
        """Restores counters saved by `get_state`."""
        self._state = check_state(state)

    # ------------------------------------------------------------ protocol

    def on_train_begin(self, logs=None):
        self._check_order()
        if self._evolver is None or self._evolver.model is not self.model:
            self._evolver = Evolver(self.model, self.options)
        self._first_epoch = True
        if self.backup_dir is not None:
            self._saved_states = self._read_backup()

    def on_epoch_begin(self, epoch, logs=None):
        # A run resumed by BackupAndRestore starts past epoch 0: take the
        # counters saved after the epoch its weights come from.
        if self._first_epoch and epoch > 0 and (epoch - 1) in self._saved_states:
            self.set_state(self._saved_states[epoch - 1])
        self._first_epoch = False

    def on_epoch_end(self, epoch, logs=None):
        if self._evolver is None:
            self.on_train_begin()
        self._first_epoch = False
        if self._should_evolve(epoch):
            report, self._state = self._evolver(epoch, self._state)
            if self.verbose:
                print(report.summary())
        else:
            report = EvolutionReport(epoch, evolved=False)
        if logs is not None:
            logs.update(report.to_logs())
        if self.backup_dir is not None:
            self._write_backup(epoch)

    def _check_order(self):
        # Callbacks run in list order: a backup taken before this callback
        # runs holds the weights from before the evolution.
        savers = (keras.callbacks.BackupAndRestore, keras.callbacks.ModelCheckpoint)
        early = [type(c).__name__ for c in _callbacks_before(self) if isinstance(c, savers)]
        if early:
            warnings.warn(
                f"{', '.join(early)} come(s) before WeightEvolution in the callbacks "
                "list, so it saves the weights from before each evolution and a "
                "resumed run will differ. Put WeightEvolution before them.",
                UserWarning,
                stacklevel=3,
            )

    def _should_evolve(self, epoch):
        if epoch < self.start_epoch or (epoch - self.start_epoch) % self.frequency:
            return False
        epochs = (self.params or {}).get("epochs")
        is_last = epochs is not None and epoch >= epochs - 1
        return self.evolve_last_epoch or not is_last

    # ------------------------------------------------------------ backup

    def _read_backup(self):
        path = os.path.join(self.backup_dir, STATE_FILE)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            saved = json.load(f)
        return {int(epoch): check_state(state) for epoch, state in saved["states"].items()}

    def _write_backup(self, epoch):
        self._saved_states[epoch] = self.get_state()
        for old in sorted(self._saved_states)[:-KEPT_STATES]:
            del self._saved_states[old]
        os.makedirs(self.backup_dir, exist_ok=True)
        path = os.path.join(self.backup_dir, STATE_FILE)
        # Written aside and renamed, so an interruption never leaves half a file.
        with open(path + ".tmp", "w") as f:
            json.dump({"states": {str(e): s for e, s in self._saved_states.items()}}, f)
        os.replace(path + ".tmp", path)


def _callbacks_before(callback):
    """The callbacks that Keras runs before `callback` in the current `fit`.

    A callback is not told its place in the list, so this looks up the
    `CallbackList` that is calling it; outside `fit` there is none.
    """
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList):
            callbacks = owner.callbacks
            return callbacks[: callbacks.index(callback)] if callback in callbacks else []
        frame = frame.f_back
    return []
