"""RePr (`keras_we.peers.RePr`): the redundancy score and the global ranking
by hand, the orthogonal re-initialization, the schedule, filters held at
zero through real `fit` batches, exact resumption, and
`keras_we.layers.batch_norm_after`."""

import math
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_we import layouts
from keras_we.experiments.recipe import PaperSGD
from keras_we.layers import batch_norm_after
from keras_we.peers import RePr
from keras_we.peers.repr import redundancy_scores, select_redundant
from tests.utils import EndIn, Interrupt, kernels

S = 1 / math.sqrt(2)


def kernel_of(*filters, size=1):
    """A Conv1D kernel `(size, C, O)` whose filter `o` is `filters[o]`, given
    as its `size * C` values row by row (`layout.filter_rows` order: channel
    by channel, each channel's `size` positions)."""
    rows = np.asarray(filters, "float32")
    return np.transpose(rows.reshape(len(filters), -1, size), (2, 1, 0))


def rows_of(kernel):
    return ops.convert_to_numpy(layouts.REGULAR_KERNEL.filter_rows(ops.convert_to_tensor(kernel)))


def chain(channels, *layers, length=4, seed=0):
    """Input `(length, channels)` -> a first Conv1D (never ranked) -> the
    given layers -> GAP -> Dense(3), compiled with PaperSGD (momentum 0.9,
    weight decay 5e-4 on every variable)."""
    x = inputs = keras.Input((length, channels))
    x = keras.layers.Conv1D(channels, 1, use_bias=False, kernel_initializer="zeros", name="first")(x)
    for layer in layers:
        x = layer(x)
    x = keras.layers.Dense(3, kernel_initializer="zeros")(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, x)
    model.compile(optimizer=PaperSGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return randomized(model, seed)


def randomized(model, seed=0):
    """`model` whose all-zero kernels (built with the `zeros` initializer, to
    spare JAX compiling a random initializer for every shape) hold seeded
    `N(0, 0.5^2)` values instead."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.path.endswith("kernel") and not np.any(value(variable)):
            variable.assign(0.5 * rng.normal(size=variable.shape).astype("float32"))
    return model


def conv(filters, size=1, name=None, kernel_initializer="zeros", **kwargs):
    return keras.layers.Conv1D(filters, size, padding="same", use_bias=False, name=name,
                               kernel_initializer=kernel_initializer, **kwargs)


def data(channels, n=32, length=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, length, channels)).astype("float32"), rng.integers(0, 3, n)


def value(variable):
    return ops.convert_to_numpy(variable).copy()


def attached(callback, model):
    callback.set_model(model)
    return callback


# ------------------------------------------------------------------ the score


# Three filters of two values: a = (2, 0), b = (0, -0.5), c = (3, 3).
# Normalized: a^ = (1, 0), b^ = (0, -1), c^ = (1, 1)/sqrt2, so the cosines are
# a.b = 0, a.c = 1/sqrt2, b.c = -1/sqrt2, and with s = 1/sqrt2
#   P = |W^ W^T - I| = [[0, 0, s], [0, 0, s], [s, s, 0]]
#   O = row sums / J(=3) = [s/3, s/3, 2s/3] = [0.2357, 0.2357, 0.4714].
THREE = kernel_of([2, 0], [0, -0.5], [3, 3])
THREE_SCORES = [S / 3, S / 3, 2 * S / 3]


def test_score_of_three_filters_by_hand():
    scores = redundancy_scores(ops.convert_to_tensor(rows_of(THREE)))
    np.testing.assert_allclose(ops.convert_to_numpy(scores), THREE_SCORES, rtol=1e-6)


def test_score_of_a_zero_filter_is_its_diagonal():
    # (0, 0) has no direction: its row of P is the diagonal |0 - 1| = 1, so
    # O = 1/3; the others see a cosine of 0 with it: a = (1, 0), c = (1, 1)
    # score (0 + s)/3 each.
    scores = redundancy_scores(ops.convert_to_tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(ops.convert_to_numpy(scores), [S / 3, 1 / 3, S / 3], rtol=1e-6)


# ------------------------------------------------------------------ the ranking

# Layer B: four filters of three values, f0 = f1 = f2 = (1, 0, 0), f3 = (0, 1, 0):
# cosines 1 among f0..f2, 0 with f3, so O = [2/4, 2/4, 2/4, 0].
FOUR = kernel_of([1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0])
FOUR_SCORES = [0.5, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("ratio, a, b", [
    # 7 filters. Each layer's lowest score is kept (A's f0, the first of
    # the tie, and B's f3); the others ranked together, highest first:
    # B0 .5, B1 .5, B2 .5 (ties in order), A2 .4714, A1 .2357.
    (0.0, [], []),
    (0.3, [], [0, 1]),  # floor(2.1) = 2
    (0.5, [], [0, 1, 2]),  # floor(3.5) = 3
    (0.6, [2], [0, 1, 2]),  # floor(4.2) = 4
    (0.9, [1, 2], [0, 1, 2]),  # floor(6.3) = 6 > the 5 droppable: one per layer stays
])
def test_global_ranking_across_two_layers(ratio, a, b):
    scores = [ops.convert_to_tensor(THREE_SCORES), ops.convert_to_tensor(FOUR_SCORES)]
    chosen = select_redundant(scores, ratio)
    assert [list(c) for c in chosen] == [a, b]


def ranked_model():
    """first (two identical filters: the most redundant, but never ranked)
    -> A (THREE) -> depthwise (never ranked) -> B (FOUR) -> BN."""
    model = chain(2, conv(3, name="a"), keras.layers.DepthwiseConv1D(
                      1, use_bias=False, depthwise_initializer="zeros", name="dw"),
                  conv(4, name="b"), keras.layers.BatchNormalization(name="bn"))
    model.get_layer("first").kernel.assign(np.ones((1, 2, 2), "float32"))
    model.get_layer("a").kernel.assign(THREE)
    model.get_layer("b").kernel.assign(FOUR)
    bn = model.get_layer("bn")
    bn.gamma.assign([1.0, 2.0, 3.0, 4.0])
    bn.beta.assign([0.5, 0.5, 0.5, 0.5])
    return model


def test_drop_ranks_the_network_together_and_zeroes_the_dropped():
    model = ranked_model()
    callback = attached(RePr(prune_ratio=0.6), model)
    logs = callback.drop(0)
    a, b = model.get_layer("a").kernel, model.get_layer("b").kernel
    assert logs == {"repr_pruned_filters": 4, "repr_held_filters": 4, "repr_reinitialized_filters": 0,
                    "repr_reinit_not_orthogonal": 0, "repr_skipped_nonfinite": 0}
    state = callback.get_state()
    assert state["dropped"] == {a.path: [2], b.path: [0, 1, 2]}
    # The values before the drop, row by row (filter_rows order).
    assert state["before"] == {a.path: [[3.0, 3.0]], b.path: [[1.0, 0.0, 0.0]] * 3}
    np.testing.assert_array_equal(value(a), THREE * [1, 1, 0])
    np.testing.assert_array_equal(value(b), FOUR * [0, 0, 0, 1])
    bn = model.get_layer("bn")
    np.testing.assert_array_equal(value(bn.gamma), [0, 0, 0, 4])
    np.testing.assert_array_equal(value(bn.beta), [0, 0, 0, 0.5])
    np.testing.assert_array_equal(value(model.get_layer("first").kernel), np.ones((1, 2, 2)))


def sequential():
    """Conv1D (first) -> BN -> ReLU -> DepthwiseConv1D -> BN -> ReLU -> Conv1D
    (4 filters, no BN) -> GAP -> Dense, like `tests.utils.tiny_cnn`."""
    zeros = {"kernel_initializer": "zeros"}
    return randomized(keras.Sequential([
        keras.Input((4, 2)),
        keras.layers.Conv1D(3, 1, use_bias=False, **zeros),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv1D(1, use_bias=False, depthwise_initializer="zeros"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv1D(4, 1, use_bias=False, **zeros),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, **zeros),
    ]))


def test_depthwise_and_first_kernels_are_not_ranked():
    model = sequential()
    callback = attached(RePr(prune_ratio=0.75), model)
    callback.drop(0)
    last = model.layers[6].kernel
    assert list(callback.get_state()["dropped"]) == [last.path]
    assert len(callback.get_state()["dropped"][last.path]) == 3  # floor(0.75 * 4)


def test_a_nonfinite_kernel_is_left_out_and_counted():
    model = ranked_model()
    broken = THREE.copy()
    broken[0, 0, 0] = np.nan
    model.get_layer("a").kernel.assign(broken)
    callback = attached(RePr(prune_ratio=0.5), model)
    logs = callback.drop(0)
    # Only B is ranked: floor(0.5 * 4) = 2 of f0..f2.
    assert logs["repr_skipped_nonfinite"] == 1 and logs["repr_pruned_filters"] == 2
    assert list(callback.get_state()["dropped"]) == [model.get_layer("b").kernel.path]
    np.testing.assert_array_equal(value(model.get_layer("a").kernel), broken)


# ------------------------------------------------------------------ re-initialization


def cosines(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x @ y.T


@pytest.mark.parametrize("initializer, std", [
    ("he_normal", math.sqrt(2 / 12)),  # 2 / fan_in, fan_in = 3 * 4
    ("glorot_uniform", math.sqrt(2 / (12 + 15))),  # 2 / (fan_in + fan_out), fan_out = 3 * 5
    ("orthogonal", None),  # no formula: the std of the kept filters' values
])
def test_reinitialized_filters_are_orthogonal_and_scaled(initializer, std):
    model = chain(4, conv(5, 3, name="c", kernel_initializer=initializer),
                  keras.layers.BatchNormalization(name="bn"))
    layer, bn = model.get_layer("c"), model.get_layer("bn")
    rng = np.random.default_rng(1)
    bn.gamma.assign(rng.uniform(0.5, 2, 5).astype("float32"))
    bn.beta.assign(rng.normal(size=5).astype("float32"))
    bn.moving_mean.assign(rng.normal(size=5).astype("float32"))
    callback = attached(RePr(prune_ratio=0.4), model)  # floor(0.4 * 5) = 2 of 5 filters, n = 12
    callback.drop(0)
    dropped = callback.get_state()["dropped"][layer.kernel.path]
    before = np.array(callback.get_state()["before"][layer.kernel.path])
    assert len(dropped) == 2
    kept = [i for i in range(5) if i not in dropped]
    # Training moves the kept filters before the re-initialization.
    moved = rows_of(value(layer.kernel))
    moved[kept] += rng.normal(size=(3, 12)).astype("float32")
    layer.kernel.assign(layouts.REGULAR_KERNEL.from_filter_rows(moved, (3, 4, 5)))
    gamma, beta, mean = value(bn.gamma), value(bn.beta), value(bn.moving_mean)

    logs = callback.reinitialize(1)
    assert logs == {"repr_pruned_filters": 0, "repr_held_filters": 0, "repr_reinitialized_filters": 2,
                    "repr_reinit_not_orthogonal": 0, "repr_skipped_nonfinite": 0}
    after = rows_of(value(layer.kernel))
    new = after[dropped]
    np.testing.assert_array_equal(after[kept], moved[kept])
    assert np.abs(cosines(new, moved[kept])).max() < 1e-6  # the kept filters now
    assert np.abs(cosines(new, before)).max() < 1e-6  # their values before the drop
    assert abs(cosines(new[:1], new[1:])[0, 0]) < 1e-6  # distinct directions
    if std is None:
        std = moved[kept].std()
    # Norm std * sqrt(n): the values' root mean square is the std.
    np.testing.assert_allclose(np.sqrt(np.mean(new**2, axis=1)), [std, std], rtol=1e-5)
    assert callback.get_state() == {"dropped": {}, "before": {}}
    np.testing.assert_array_equal(value(bn.gamma), np.where(np.isin(range(5), dropped), 1, gamma))
    np.testing.assert_array_equal(value(bn.beta), np.where(np.isin(range(5), dropped), 0, beta))
    np.testing.assert_array_equal(value(bn.moving_mean), mean)  # moving statistics left alone


def test_reinitialization_where_the_null_space_is_too_small():
    # A 1x1 conv, 4 filters of n = 3 values:
    #   f0 = (1, 0, 0), f1 = (0, 1, 0), f2 = (0, 1, 1), f3 = (1, 1, 1).
    # Cosines: f0f1 0, f0f2 0, f0f3 .5774, f1f2 .7071, f1f3 .5774, f2f3 .8165, so
    # O = [.1443, .3211, .3809, .4928]: floor(0.25 * 4) = 1 drops f3.
    # J + d = 5 rows > n = 3: the new filter is orthogonal to the first
    # n - d = 2 rows of [kept, most unique first; f3 before]. With f3 held at
    # zero the kept score O0 = 0, O1 = O2 = .7071/4 (tie: f1 first), so it
    # is orthogonal to f0 and f1: +-(0, 0, 1), scaled to glorot_uniform's
    # std sqrt(2 / (3 + 4)) times sqrt(3).
    model = chain(3, conv(4, name="c", kernel_initializer="glorot_uniform"))
    layer = model.get_layer("c")
    layer.kernel.assign(kernel_of([1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1]))
    callback = attached(RePr(prune_ratio=0.25), model)
    callback.drop(0)
    assert callback.get_state()["dropped"] == {layer.kernel.path: [3]}
    logs = callback.reinitialize(1)
    assert logs["repr_reinitialized_filters"] == 1 and logs["repr_reinit_not_orthogonal"] == 1
    new = rows_of(value(layer.kernel))[3]
    np.testing.assert_allclose(np.abs(new), [0, 0, math.sqrt(6 / 7)], atol=1e-6)


# ------------------------------------------------------------------ the schedule


def actions(callback, epochs):
    drops = [e for e in range(epochs) if callback.phase(e) == "drop"]
    reinits = [e for e in range(epochs) if callback.phase(e) == "reinit"]
    return drops, reinits


def test_schedule():
    # P = 3: cycle k drops after epoch 3k + 1 and re-initializes after 3k + 2,
    # if 3(k + 1) <= 7: k = 0, 1 (the cycle k = 2 would end at 9).
    assert actions(RePr(train_epochs=2, prune_epochs=1, last_epoch=7), 20) == ([1, 4], [2, 5])
    # The pinned defaults: six cycles of 30 epochs ending at 180.
    assert actions(RePr(), 200) == (list(range(19, 180, 30)), list(range(29, 180, 30)))
    assert actions(RePr(last_epoch=0), 200) == ([], [])


@pytest.mark.parametrize("epochs, expected", [
    (8, (1, 1, 7)),  # s = 0.04: max(1, round(0.8)), max(1, round(0.4)), round(7.2)
    (30, (3, 2, 27)),  # s = 0.15: round(3), round(1.5) = 2, round(27)
    (200, (20, 10, 180)),
])
def test_scaled(epochs, expected):
    callback = RePr.scaled(epochs, backup_dir="somewhere")
    assert (callback.train_epochs, callback.prune_epochs, callback.last_epoch) == expected
    assert callback.backup_dir == "somewhere"


def test_scaled_eight_epochs_acts_in_three_cycles():
    assert actions(RePr.scaled(8), 8) == ([0, 2, 4], [1, 3, 5])


# ------------------------------------------------------------------ through fit


class Probe(keras.callbacks.Callback):
    """After every batch (and after RePr's hold), records the largest
    magnitude among the kernel columns and BatchNorm entries RePr holds."""

    def __init__(self, callback, layer, bn):
        super().__init__()
        self.callback, self.layer, self.bn = callback, layer, bn
        self.held = {}  # epoch -> [largest |value| of the held entries, per batch]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.dropped = self.callback.get_state()["dropped"].get(self.layer.kernel.path, [])

    def on_train_batch_end(self, batch, logs=None):
        if self.dropped:
            self.model  # noqa: B018  (on JAX, syncs the training state)
            rows = rows_of(value(self.layer.kernel))[self.dropped]
            entries = np.concatenate([value(self.bn.gamma)[self.dropped], value(self.bn.beta)[self.dropped]])
            self.held.setdefault(self.epoch, []).append(max(np.abs(rows).max(), np.abs(entries).max()))


def test_dropped_filters_held_at_zero_through_fit_batches():
    # Cycles of 1 + 1 epochs: drop after epochs 0 and 2, re-initialize after
    # epoch 1; the re-initialization after epoch 3, the last, never happens.
    model = chain(4, conv(8, 3, name="c"), keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU())
    layer, bn = model.get_layer("c"), model.get_layer("bn")
    callback = RePr(prune_ratio=0.3, train_epochs=1, prune_epochs=1, last_epoch=10)
    probe = Probe(callback, layer, bn)
    x, y = data(4)
    history = model.fit(x, y, epochs=4, batch_size=8, shuffle=False, verbose=0, callbacks=[callback, probe])
    k = 2  # floor(0.3 * 8)
    logs = history.history
    assert logs["repr_pruned_filters"] == [0, k, 0, k]
    assert logs["repr_held_filters"] == [0, k, 0, k]
    assert logs["repr_reinitialized_filters"] == [0, 0, k, 0]
    assert logs["repr_reinit_not_orthogonal"] == [0, 0, 0, 0]
    # Momentum (0.9) and weight decay could not move them in any of the 4
    # batches of the pruned epochs.
    assert sorted(probe.held) == [1, 3]
    assert probe.held[1] == [0.0] * 4 and probe.held[3] == [0.0] * 4
    # Nothing after the last epoch: the filters dropped after epoch 2 are still zero.
    dropped = callback.get_state()["dropped"][layer.kernel.path]
    assert np.all(rows_of(value(layer.kernel))[dropped] == 0)
    assert np.all(value(bn.gamma)[dropped] == 0) and np.all(value(bn.beta)[dropped] == 0)
    kept = np.delete(rows_of(value(layer.kernel)), dropped, axis=0)
    assert np.all(np.linalg.norm(kept, axis=1) > 0)


def test_frozen_layers_are_untouched():
    model = chain(4, conv(6, name="frozen"), conv(6, name="c"), keras.layers.BatchNormalization(name="bn"))
    frozen, bn = model.get_layer("frozen"), model.get_layer("bn")
    frozen.trainable = False
    bn.trainable = False  # the BN after the ranked conv: not held at zero
    model.compile(optimizer=PaperSGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = value(frozen.kernel), value(bn.gamma), value(bn.beta)
    callback = RePr(prune_ratio=0.5, train_epochs=1, prune_epochs=1, last_epoch=2)
    x, y = data(4)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    assert history.history["repr_pruned_filters"] == [0, 3]  # floor(0.5 * 6), "c" only
    assert list(callback.get_state()["dropped"]) == [model.get_layer("c").kernel.path]
    for before, after in zip(start, (frozen.kernel, bn.gamma, bn.beta)):
        np.testing.assert_array_equal(value(after), before)


# ------------------------------------------------------------------ resumption


def train(backup_dir, interrupt=None):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    model = chain(4, conv(8, 3, name="c"), keras.layers.BatchNormalization(), keras.layers.ReLU())
    callback = RePr(prune_ratio=0.3, train_epochs=1, prune_epochs=1, last_epoch=4,
                    backup_dir=os.path.join(backup_dir, "repr"))
    callbacks = [callback, keras.callbacks.BackupAndRestore(os.path.join(backup_dir, "keras"))]
    x, y = data(4, n=32)
    model.fit(x, y, epochs=4, batch_size=8, shuffle=False, verbose=0,
              callbacks=callbacks + ([interrupt] if interrupt else []))
    return model, callback


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's weights and final RePr state."""
    model, callback = train(str(tmp_path_factory.mktemp("straight")))
    return kernels(model), callback.get_state()


@pytest.mark.parametrize("epoch, mid_epoch", [(1, False), (2, True)], ids=["end1-pruned", "mid2"])
def test_interrupted_run_resumes_bit_identically(tmp_path, straight, epoch, mid_epoch):
    weights, state = straight
    backup = str(tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        train(backup, EndIn(epoch, mid_epoch, batch=1))
    assert os.path.exists(os.path.join(backup, "repr", "repr_state.json"))
    resumed, resumed_repr = train(backup)
    assert resumed_repr.get_state() == state
    assert state["dropped"]  # the run ends in a pruned phase
    for a, b in zip(weights, kernels(resumed)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, error, name", [
    ({"prune_ratio": 1.0}, ValueError, "prune_ratio"),
    ({"prune_ratio": -0.1}, ValueError, "prune_ratio"),
    ({"prune_ratio": "0.3"}, TypeError, "prune_ratio"),
    ({"train_epochs": 0}, ValueError, "train_epochs"),
    ({"prune_epochs": 1.5}, TypeError, "prune_epochs"),
    ({"last_epoch": -1}, ValueError, "last_epoch"),
    ({"verbose": -1}, ValueError, "verbose"),
    ({"backup_dir": 3}, TypeError, "backup_dir"),
])
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        RePr(**kwargs)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"epochs": 0}, ValueError, "epochs"),
    ({"epochs": 8, "reference_epochs": 0}, ValueError, "reference_epochs"),
    ({"epochs": 8, "lr_milestones": ()}, ValueError, "lr_milestones"),
    ({"epochs": 8, "lr_milestones": (60, -1)}, ValueError, "lr_milestones"),
])
def test_bad_scaled_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        RePr.scaled(**kwargs)


# ------------------------------------------------------------------ batch_norm_after


def test_batch_norm_after_in_a_sequential():
    model = sequential()
    layers = model.layers
    assert batch_norm_after(model) == {layers[0]: layers[1], layers[3]: layers[4]}


def test_batch_norm_after_in_a_functional_resnet_block():
    # x -> conv1 -> bn1 -> relu -> conv2 -> bn2 -> + -> relu -> out -> relu -> bn_late
    # x -> shortcut -> bn_s ----------------------^
    # conv2 and shortcut both have 8 filters and shortcut's BN is called
    # first, so traversal order alone would give conv2 the wrong BN; `out`
    # feeds a ReLU, not a BN (bn_late normalizes the ReLU's output).
    inputs = keras.Input((6, 6, 4))
    conv1, conv2, shortcut, out = (keras.layers.Conv2D(8, 3, padding="same", kernel_initializer="zeros")
                                   for _ in range(4))
    bn1, bn2, bn_s, bn_late = (keras.layers.BatchNormalization() for _ in range(4))
    x = keras.layers.ReLU()(bn1(conv1(inputs)))
    s = bn_s(shortcut(inputs))
    x = keras.layers.ReLU()(keras.layers.Add()([bn2(conv2(x)), s]))
    x = bn_late(keras.layers.ReLU()(out(x)))
    model = keras.Model(inputs, x)
    assert batch_norm_after(model) == {conv1: bn1, conv2: bn2, shortcut: bn_s}


def test_batch_norm_after_in_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv1 = keras.layers.Conv2D(8, 3, kernel_initializer="zeros")
            self.bn1 = keras.layers.BatchNormalization()
            self.conv2 = keras.layers.Conv2D(4, 1, kernel_initializer="zeros")  # no BN before the next conv
            self.conv3 = keras.layers.Conv2D(6, 1, kernel_initializer="zeros")
            self.bn3 = keras.layers.BatchNormalization()
            self.conv4 = keras.layers.Conv2D(5, 1, kernel_initializer="zeros")
            self.bn_other = keras.layers.BatchNormalization()  # 3 channels: not conv4's

        def call(self, x):
            x = self.conv4(self.bn3(self.conv3(self.conv2(self.bn1(self.conv1(x))))))
            return self.bn_other(x[..., :3])

    model = Net()
    model(np.zeros((1, 6, 6, 3), "float32"))
    assert batch_norm_after(model) == {model.conv1: model.bn1, model.conv3: model.bn3}
