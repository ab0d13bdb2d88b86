"""Experiment tooling around Weight Evolution, apart from the method itself.

The method (`keras_we.WeightEvolution`, `keras_we.evolve`, the strategies
and schedules) works on any Keras model and any data. This subpackage holds
what the paper's experiments add, as separate modules that are imported
only when asked for:

- `keras_we.experiments.models`: the paper's CIFAR networks (and
  `keras.applications` by name);
- `keras_we.experiments.layers`: their two custom layers, which
  `import keras_we` registers so that saved models load anywhere;
- `keras_we.experiments.data`: CIFAR loading, augmentation and the seeded
  `CifarSequence` (with `SyncEpoch`) for `model.fit()`;
- `keras_we.experiments.recipe`: the paper's training recipe (`Recipe`,
  the optimizer `PaperSGD`);
- `keras_we.experiments.runner`: paired runs and their summary;
- `keras_we.experiments.cli`: the `keras-we` command over the runner.

`keras_we.models` and `keras_we.data` still work as attributes of
`keras_we` (imported on first access), for code written before the move.
"""
