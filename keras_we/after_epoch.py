"""`AfterEpochCallback`: the protocol every method of this package shares
for changing a model's weights between epochs.

Weight Evolution and its peers (`keras_we.peers`) rewrite weights after an
epoch. Doing that in `on_epoch_end` would write after the last epoch (the
returned model would hold weights that never trained) and would race with
the callbacks that save or validate at the end of an epoch, depending on
their order in the callbacks list. So the action after epoch `e` runs as
epoch `e + 1` begins: only when another epoch follows, whatever ended the
run (`epochs` reached, `EarlyStopping`, `TerminateOnNaN`, an exception) and
whatever the order of the callbacks. Callbacks that save weights at the end
of an epoch save the weights that were trained and validated, and a run
resumed from them (or continued with `initial_epoch`) applies the same
action before it trains, so it stays exact.

A subclass defines `act(epoch)` (the action after `epoch`, returning what
it did as a logs dict) and `idle_logs()` (the same keys, for an epoch with
no action), and, when it carries state across epochs, `get_state`,
`set_state` and a `state_file` name: with a `backup_dir`, the state after
each epoch is kept there, so a run resumed by
`keras.callbacks.BackupAndRestore` continues with the state of the epoch it
resumes from.
"""

import json
import os

import keras

from keras_we.validation import check_bool, check_int

KEPT_STATES = 3


class AfterEpochCallback(keras.callbacks.Callback):
    """Base class of callbacks that change the weights between epochs.

    Args:
        frequency: act every `frequency` epochs, counted from `start_epoch`.
        start_epoch: first 0-based epoch after which to act.
        act_after_last_epoch: also act after the last epoch that ran (in
            `on_train_end`); that action is in no epoch's logs.
        backup_dir: a folder for the state after each epoch (see the module
            docstring), or None.
        verbose: 1 prints `summary(epoch, logs)` after each action.
    """

    #: File name of the state in `backup_dir`; subclasses with state set it.
    state_file = None

    def __init__(self, frequency=1, start_epoch=0, act_after_last_epoch=False,
                 backup_dir=None, verbose=0):
        super().__init__()
        self.frequency = check_int("frequency", frequency, minimum=1)
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.act_after_last_epoch = check_bool("act_after_last_epoch", act_after_last_epoch)
        if backup_dir is not None and not isinstance(backup_dir, (str, os.PathLike)):
            raise TypeError(f"`backup_dir` must be None or a folder path; got {backup_dir!r}.")
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        self.verbose = check_int("verbose", verbose, minimum=0)
        self._saved_states = {}
        self._first_epoch = True
        self._last_ended = None  # the last epoch that ended in this `fit`
        self._logs = None  # what the action before the current epoch did

    # ------------------------------------------------------------ for subclasses

    def act(self, epoch):
        """Changes the weights after `epoch`; returns what it did, as logs."""
        raise NotImplementedError

    def idle_logs(self):
        """The logs of an epoch that no action preceded (zeros)."""
        return {}

    def summary(self, epoch, logs):
        """One line for `verbose=1`."""
        figures = ", ".join(f"{key} {value:.4g}" for key, value in logs.items())
        return f"{type(self).__name__} after epoch {epoch + 1}: {figures}"

    def scheduled(self, epoch):
        """Whether to act after `epoch`."""
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.frequency == 0

    def write_after_batch(self, write):
        """Calls `write()`, which writes the model's variables, from
        `on_train_batch_end`. During `fit` on JAX the trainer holds the
        trained values apart from the variables and puts them back when
        `Callback.model` is read: reading it first keeps the write from
        being overwritten by the next batch."""
        self.model  # noqa: B018
        write()

    def get_state(self):
        """What the callback carries across epochs, as a JSON-able dict."""
        return {}

    def set_state(self, state):
        """Restores a state saved by `get_state`."""

    # ------------------------------------------------------------ protocol

    def on_train_begin(self, logs=None):
        self._first_epoch = True
        self._last_ended = None
        if self.backup_dir is not None and self.state_file is not None:
            self._saved_states = self._read_backup()

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            # A run that starts past epoch 0 (resumed by BackupAndRestore,
            # or continued with `initial_epoch`) holds the weights trained
            # up to `epoch - 1`, not yet acted on: take the state saved then.
            if epoch > 0 and (epoch - 1) in self._saved_states:
                self.set_state(self._saved_states[epoch - 1])
        # Keras begins epoch `e` only when epoch `e - 1` ended (or `e` is
        # where this `fit` starts), so the action after `e - 1` is due.
        self._logs = self._act(epoch - 1) if epoch > 0 and self.scheduled(epoch - 1) else None

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.idle_logs() if self._logs is None else self._logs)
        self._logs = None
        self._last_ended = epoch
        if self.backup_dir is not None and self.state_file is not None:
            self._write_backup(epoch)

    def on_train_end(self, logs=None):
        last = self._last_ended
        if self.act_after_last_epoch and last is not None and self.scheduled(last):
            self._act(last)
        self._last_ended = None

    def _act(self, epoch):
        logs = self.act(epoch)
        if self.verbose:
            print(self.summary(epoch, logs))
        return logs

    # ------------------------------------------------------------ backup

    def _read_backup(self):
        path = os.path.join(self.backup_dir, self.state_file)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            saved = json.load(f)
        return {int(epoch): state for epoch, state in saved["states"].items()}

    def _write_backup(self, epoch):
        self._saved_states[epoch] = self.get_state()
        for old in sorted(self._saved_states)[:-KEPT_STATES]:
            del self._saved_states[old]
        os.makedirs(self.backup_dir, exist_ok=True)
        path = os.path.join(self.backup_dir, self.state_file)
        # Written aside and renamed, so an interruption never leaves half a file.
        with open(path + ".tmp", "w") as f:
            json.dump({"states": {str(e): s for e, s in self._saved_states.items()}}, f)
        os.replace(path + ".tmp", path)
