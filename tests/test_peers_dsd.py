"""DSD, dense - sparse - dense training (`keras_we.peers.DSD`): the mask,
its hold through real training, the phases, what is never pruned, resume."""

import json
import math
import os

import keras
import numpy as np
import pytest

from keras_we import peers
from keras_we.experiments.recipe import PaperSGD
from keras_we.peers import dsd
from tests.utils import EndIn, Interrupt, tiny_cnn, toy_data

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
KEYS = ("dsd_sparsity", "dsd_pruned_values", "dsd_skipped_nonfinite")

# tiny_cnn's kernels and floor(0.3 * size) of each: Conv2D 3x3x3x8 = 216 -> 64,
# DepthwiseConv2D 3x3x8x1 = 72 -> 21, Conv2D 1x1x8x16 = 128 -> 38, Dense
# 16x3 = 48 -> 14: 137 of 464 values.
TINY_PRUNED, TINY_SIZE = 137, 464


def numpy(value):
    return keras.ops.convert_to_numpy(value).copy()


def drive(callback, model, epochs, until=None):
    """Runs `callback` through epochs of one batch as `fit` does, without
    training; returns each epoch's logs."""
    callback.set_model(model)
    callback.set_params({"epochs": epochs, "steps": 1, "verbose": 0})
    callback.on_train_begin()
    history = []
    for epoch in range(epochs if until is None else until):
        callback.on_epoch_begin(epoch)
        callback.on_train_batch_begin(0)
        callback.on_train_batch_end(0, {})
        logs = {}
        callback.on_epoch_end(epoch, logs)
        history.append(logs)
    callback.on_train_end()
    return history


def expected_keep(value, sparsity=0.3):
    """The mask worked out in NumPy: the floor(sparsity * size) smallest |w| go,
    ties to the first in flat order."""
    flat = value.ravel()
    keep = np.ones(flat.size, bool)
    keep[np.argsort(np.abs(flat), kind="stable")[:math.floor(sparsity * flat.size)]] = False
    return keep.reshape(value.shape)


# ------------------------------------------------------------ the mask

# |w| ascending: 0.05 (index 5), 0.1 (index 1), then 0.2 three times
# (indices 2, 3, 8), 0.3, ... floor(0.3 * 10) = 3 values go: indices 5, 1
# and, of the tied 0.2s, the first in flat order, index 2.
W = np.array([0.5, -0.1, 0.2, -0.2, 0.9, 0.05, -0.7, 0.3, 0.2, 1.0], "float32")
KEEP = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 1], bool)


def test_keep_mask_on_a_hand_worked_kernel():
    mask = numpy(dsd.keep_mask(keras.ops.convert_to_tensor(W.reshape(2, 5)), 3))
    np.testing.assert_array_equal(mask.reshape(-1), KEEP)
    assert dsd.pruned_count(0.3, 10) == 3
    assert dsd.pruned_count(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in floats


def test_prune_zeroes_the_smallest_values_of_a_dense_kernel_not_its_bias():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(5)])
    model.layers[0].kernel.assign(W.reshape(2, 5))
    bias = np.full(5, 0.01, "float32")  # smaller than every weight: still not pruned
    model.layers[0].bias.assign(bias)
    history = drive(peers.DSD(), model, 3)  # 3 epochs: sparse epoch 1
    np.testing.assert_array_equal(numpy(model.layers[0].kernel).reshape(-1), np.where(KEEP, W, 0))
    np.testing.assert_array_equal(numpy(model.layers[0].bias), bias)
    assert [logs["dsd_pruned_values"] for logs in history] == [0, 3, 0]
    assert [logs["dsd_sparsity"] for logs in history] == [0, pytest.approx(0.3), 0]


def test_nonfinite_kernel_is_left_dense_and_counted():
    model = tiny_cnn()
    depthwise = model.layers[3].kernel
    value = numpy(depthwise)
    value[0, 0, 0, 0] = np.nan
    depthwise.assign(value)
    history = drive(peers.DSD(), model, 3)
    np.testing.assert_array_equal(numpy(depthwise), value)  # nothing zeroed, the NaN as it was
    # The other kernels lose 64 + 38 + 14 = 116 values of the 464 prunable.
    assert history[1] == {"dsd_sparsity": pytest.approx(116 / TINY_SIZE),
                          "dsd_pruned_values": 116, "dsd_skipped_nonfinite": 1}
    for target in (model.layers[0].kernel, model.layers[6].kernel, model.layers[8].kernel):
        assert np.count_nonzero(numpy(target) == 0) == math.floor(0.3 * math.prod(target.shape))


# ------------------------------------------------------------ through fit


class Watch(keras.callbacks.Callback):
    """Records the prunable kernels after every batch, and every weight at
    each epoch's end."""

    def __init__(self):
        super().__init__()
        self.batches, self.epochs, self.epoch = [], [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((self.epoch, [numpy(v) for v in dsd.prunable_kernels(self.model)]))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({w.path: numpy(w) for w in self.model.weights})


def test_mask_holds_through_fit_with_momentum_and_weight_decay_then_lifts():
    model = tiny_cnn()
    model.compile(optimizer=PaperSGD(0.05, momentum=0.9, l2=5e-4), loss=LOSS)
    before, after = Watch(), Watch()  # they see each batch before and after DSD's hold
    x, y = toy_data(64)
    history = model.fit(x, y, epochs=6, batch_size=16, shuffle=False, verbose=0,
                        callbacks=[before, peers.DSD(), after])
    # 6 epochs: sparse epochs [round(6/3), round(12/3)) = [2, 4), pruned
    # from the weights at the end of epoch 1.
    paths = [v.path for v in dsd.prunable_kernels(model)]
    keep = [expected_keep(after.epochs[1][path]) for path in paths]
    assert [int((~k).sum()) for k in keep] == [64, 21, 38, 14]

    sparse = [(b, a) for (e, b), (_, a) in zip(before.batches, after.batches) if e in (2, 3)]
    assert len(sparse) == 8
    for moved, held in sparse:
        for k, b, a in zip(keep, moved, held):
            assert np.abs(b[~k]).max() > 0  # momentum and weight decay move them ...
            assert np.all(a[~k] == 0)  # ... and DSD sets them back to zero
            assert np.all(a[k] == b[k])  # the kept values as the optimizer left them

    # Biases and BatchNorm are never pruned.
    for path, value in after.epochs[3].items():
        if path not in paths:
            assert np.all(value != 0), path
    # After the lift the pruned values train again, from zero.
    for path, k in zip(paths, keep):
        assert np.all(after.epochs[4][path][~k] != 0), path

    logs = history.history
    assert logs["dsd_pruned_values"] == [0, 0, TINY_PRUNED, 0, 0, 0]
    s = TINY_PRUNED / TINY_SIZE
    assert logs["dsd_sparsity"] == pytest.approx([0, 0, s, s, 0, 0])
    assert logs["dsd_skipped_nonfinite"] == [0] * 6


def test_frozen_layer_is_not_pruned():
    model = tiny_cnn()
    model.layers[0].trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS)
    frozen = numpy(model.layers[0].kernel)
    x, y = toy_data()
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[peers.DSD()])
    np.testing.assert_array_equal(numpy(model.layers[0].kernel), frozen)
    # Without the frozen 216-value conv: 21 + 38 + 14 = 73 of 72 + 128 + 48 = 248 values.
    assert history.history["dsd_pruned_values"] == [0, 73, 0]
    assert history.history["dsd_sparsity"] == pytest.approx([0, 73 / 248, 0])


# ------------------------------------------------------------ phases


@pytest.mark.parametrize("epochs, sparse_epochs, phase", [
    (3, None, (1, 2)),  # round(1) = 1, round(2) = 2
    (8, None, (3, 5)),  # round(2.67) = 3, round(5.33) = 5
    (200, None, (67, 133)),  # round(66.67) = 67, round(133.33) = 133
    (8, (1, 7), (1, 7)),
    (5, (2, 5), (2, 5)),  # sparse to the end: the lift would follow the last epoch
])
def test_sparse_phase(epochs, sparse_epochs, phase):
    callback = peers.DSD(sparse_epochs=sparse_epochs)
    history = drive(callback, tiny_cnn(), epochs)
    assert callback.phase == phase
    assert [e for e, logs in enumerate(history) if logs["dsd_pruned_values"]] == [phase[0]]
    assert [e for e, logs in enumerate(history) if logs["dsd_sparsity"]] == list(range(*phase))
    assert bool(callback.get_state()["masks"]) == (phase[1] == epochs)


def test_too_few_epochs_for_a_middle_third():
    model = tiny_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS)
    x, y = toy_data(16)
    with pytest.raises(ValueError, match="`sparse_epochs=None`.*epochs=2"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[peers.DSD()])
    with pytest.raises(ValueError, match="`sparse_epochs` must end by fit's epochs=3"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[peers.DSD(sparse_epochs=(1, 4))])


# ------------------------------------------------------------ state and resume


def test_state_is_compact_json():
    callback = peers.DSD()
    drive(callback, tiny_cnn(), 3, until=2)  # the mask is held after epoch 1
    state = json.loads(json.dumps(callback.get_state()))
    assert state["prunable_values"] == TINY_SIZE
    # One bit per value in base64: 216 values in 27 bytes, 36 characters;
    # 72 in 9, 12; 128 in 16, 24; 48 in 6, 8.
    assert [(e["kernel"], len(e["keep"])) for e in state["masks"]] == [(0, 36), (1, 12), (2, 24), (3, 8)]
    fresh = peers.DSD()
    fresh.set_model(callback.model)
    fresh.set_state(state)
    assert fresh.get_state() == callback.get_state()
    assert fresh.idle_logs()["dsd_sparsity"] == pytest.approx(TINY_PRUNED / TINY_SIZE)


def train(folder, interrupt=None):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    model = tiny_cnn()
    model.compile(optimizer=PaperSGD(0.05), loss=LOSS)
    callbacks = [peers.DSD(sparse_epochs=(1, 3), backup_dir=os.path.join(folder, "dsd")),
                 keras.callbacks.BackupAndRestore(os.path.join(folder, "keras"))]
    if interrupt is not None:
        callbacks.append(interrupt)
    x, y = toy_data(32)
    history = model.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks)
    return [numpy(w) for w in model.weights], history.history


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train(str(tmp_path_factory.mktemp("straight")))


# Sparse epochs [1, 3). Ended at epoch 1's end: resumed in the sparse phase,
# with the saved mask. Ended in epoch 1: resumed from epoch 0's end, where
# the prune runs. Ended at epoch 2's end: the lift runs on resume.
@pytest.mark.parametrize("epoch, mid_epoch", [(1, False), (1, True), (2, False)],
                         ids=["end1", "mid1", "end2"])
def test_interrupted_run_resumes_bit_identically(tmp_path, straight, epoch, mid_epoch):
    with pytest.raises(Interrupt):
        train(str(tmp_path), EndIn(epoch, mid_epoch, batch=0))
    assert os.path.exists(os.path.join(tmp_path, "dsd", "dsd_state.json"))
    weights, logs = train(str(tmp_path))
    assert len(logs["loss"]) == 4 - (epoch if mid_epoch else epoch + 1)  # it resumed
    for a, b in zip(straight[0], weights):
        np.testing.assert_array_equal(a, b)
    for key in KEYS:
        assert logs[key] == straight[1][key][-len(logs[key]):]
    assert straight[1]["dsd_sparsity"][1] > 0


# ------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, error, name", [
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"sparsity": 1}, ValueError, "sparsity"),
    ({"sparsity": 1.5}, ValueError, "sparsity"),
    ({"sparsity": float("nan")}, ValueError, "sparsity"),
    ({"sparsity": "0.3"}, TypeError, "sparsity"),
    ({"sparsity": True}, TypeError, "sparsity"),
    ({"sparse_epochs": (0, 2)}, ValueError, "sparse_epochs"),
    ({"sparse_epochs": (2, 2)}, ValueError, "sparse_epochs"),
    ({"sparse_epochs": (3, 1)}, ValueError, "sparse_epochs"),
    ({"sparse_epochs": (1,)}, TypeError, "sparse_epochs"),
    ({"sparse_epochs": (1, 2, 3)}, TypeError, "sparse_epochs"),
    ({"sparse_epochs": (1.0, 2)}, TypeError, "sparse_epochs"),
    ({"sparse_epochs": (True, 2)}, TypeError, "sparse_epochs"),
    ({"sparse_epochs": 2}, TypeError, "sparse_epochs"),
    ({"verbose": -1}, ValueError, "verbose"),
    ({"backup_dir": 3}, TypeError, "backup_dir"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        peers.DSD(**kwargs)
