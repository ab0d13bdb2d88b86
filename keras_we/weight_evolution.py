"""The `WeightEvolution` Keras callback."""

from keras_we.after_epoch import AfterEpochCallback
from keras_we.evolution import (
    EvolutionOptions,
    EvolutionReport,
    check_state,
    evolver_for,
    initial_state,
)
from keras_we.validation import check_bool

STATE_FILE = "weight_evolution_state.json"


class WeightEvolution(AfterEpochCallback):
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
    number of trainable conv kernels.

    **When.** The evolution after epoch `e` runs as epoch `e + 1` begins,
    so only when another epoch follows: never after the last epoch that
    ran, whether `fit` reached `epochs`, `EarlyStopping` or `TerminateOnNaN`
    stopped it, or an exception ended it, and whatever the order of the
    callbacks list. Callbacks that save weights at the end of an epoch
    (`BackupAndRestore`, `ModelCheckpoint`, `EarlyStopping` with
    `restore_best_weights`) save the weights that were trained and
    validated; a run resumed from them (or continued with `initial_epoch`)
    applies the same evolution before it trains, so it stays exact.

    **Frozen weights.** Only trainable variables take part. A layer or
    model set `trainable = False` (a fine-tuning backbone), the base kernel
    of a LoRA layer and any variable created with `trainable=False` are
    neither ranked nor rewritten: in the SPEC's terms they are not in the
    network at all, so the global threshold `T_g` is the `r(e)`-quantile of
    the trainable filters' scores, `K` counts trainable conv kernels, and
    the starvation counter does not pass through frozen layers. Unfreezing
    them later (and calling `fit` again) adds them from the next evolution
    on.

    **Logs.** Each epoch adds to `logs` what the evolution that preceded
    the epoch did (so epoch 0 shows zeros, and epoch `e` the evolution
    after epoch `e - 1`): the items evolved (`we_conv_evolved`,
    `we_gamma_evolved`, `we_beta_evolved`), the ratios used
    (`we_conv_ratio`, ...), `we_changed_elements` and
    `we_skipped_nonfinite`, so `History`, `CSVLogger` and `TensorBoard`
    record them in any order of the callbacks list.

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
        schedule: a `keras_we.Schedule` (`ratio(base, epoch)`) or a callable
            `epoch -> multiplier` of the three ratios. Defaults
            to `None`, the paper's CIFAR `PaperSchedule()`; for short runs use
            `PaperSchedule().scaled(epochs)`. Each ratio times the multiplier
            must lie in [0, 1] at every epoch: `fit` checks all its epochs
            when training begins and raises `ValueError` otherwise (no
            clipping).
        crossover: `"paper"` (the paper's Fig. 1: the weakest element moves
            towards the dominant filter's strongest) or `"reference"` (what
            the public code computes, with which the paper's results were
            obtained), or the name of a mode registered with
            `keras_we.register_crossover`, or a `keras_we.Crossover`.
            Defaults to `"reference"`: in paired CPU runs it ended at least
            as accurate as `"paper"` at every seed (README).
        frequency: evolve every `frequency` epochs, counted from
            `start_epoch`. Defaults to 1.
        start_epoch: first 0-based epoch after which to evolve. Defaults to 0.
        evolve_last_epoch: also evolve after the last epoch that ran (in
            `on_train_end`), as the public code does; the returned model
            then holds rewritten filters that never trained, and that last
            evolution is in no epoch's logs. Defaults to False.
        backup_dir: a folder where the callback keeps its state after each
            epoch, so that a run resumed with
            `keras.callbacks.BackupAndRestore` continues with the same
            starvation counters. Defaults to None (no file). (With
            `BackupAndRestore(save_freq=<batches>)`, a run resumed in the
            middle of an epoch restarts that epoch from weights that were
            already evolved, and evolves them again; Keras does not resume
            such runs exactly either.)
        verbose: 1 prints one line per evolution. Defaults to 0.
    """

    state_file = STATE_FILE

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
        super().__init__(
            frequency=frequency,
            start_epoch=start_epoch,
            act_after_last_epoch=check_bool("evolve_last_epoch", evolve_last_epoch),
            backup_dir=backup_dir,
            verbose=verbose,
        )
        self.options = EvolutionOptions(
            conv_ratio=conv_ratio,
            gamma_ratio=gamma_ratio,
            beta_ratio=beta_ratio,
            local_ratio=local_ratio,
            force_divisor=force_divisor,
            schedule=schedule,
            crossover=crossover,
        )
        self._state = initial_state()

    @property
    def evolve_last_epoch(self):
        return self.act_after_last_epoch

    def get_state(self):
        """The starvation counters carried across epochs, as a JSON-able dict."""
        return dict(self._state)

    def set_state(self, state):
        """Restores counters saved by `get_state`."""
        self._state = check_state(state)

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        if epochs:
            for epoch in range(epochs):  # a schedule out of [0, 1] fails now, not later
                self.options.ratios(epoch)
        super().on_train_begin(logs)

    def act(self, epoch):
        """Evolves the model after `epoch` (see `AfterEpochCallback`)."""
        self.report, self._state = evolver_for(self.model, self.options)(epoch, self._state)
        return self.report.to_logs()

    def idle_logs(self):
        return EvolutionReport(0, evolved=False).to_logs()

    def summary(self, epoch, logs):
        return self.report.summary()
