"""Interrupted runs resume exactly; saved models reload exactly."""

import os

import keras
import numpy as np
import pytest

import keras_we
from tests.utils import EndIn, Interrupt, kernels, small_cnn, toy_data

EPOCHS = 4


def deterministic():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def train(backup_dir, interrupt=None, we_first=True):
    deterministic()
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=model.loss)
    evolution = keras_we.WeightEvolution(backup_dir=os.path.join(backup_dir, "we"))
    backup = keras.callbacks.BackupAndRestore(os.path.join(backup_dir, "keras"))
    callbacks = [evolution, backup] if we_first else [backup, evolution]
    if interrupt is not None:
        callbacks.append(interrupt)
    x, y = toy_data(64)
    model.fit(x, y, epochs=EPOCHS, batch_size=16, shuffle=False, verbose=0, callbacks=callbacks)
    return model, evolution


@pytest.mark.parametrize(
    "epoch, mid_epoch, we_first",
    [(0, False, True), (2, False, True), (2, False, False), (2, True, True), (1, True, False)],
    ids=["end0", "end2", "end2-we-last", "mid2", "mid1-we-last"],
)
def test_interrupted_run_resumes_bit_identically(tmp_path, epoch, mid_epoch, we_first):
    straight, straight_we = train(str(tmp_path / "straight"))

    backup = str(tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        train(backup, EndIn(epoch, mid_epoch, batch=1), we_first)
    assert os.path.exists(os.path.join(backup, "we", "weight_evolution_state.json"))
    resumed, resumed_we = train(backup, we_first=we_first)

    assert resumed_we.get_state() == straight_we.get_state()
    for a, b in zip(kernels(straight), kernels(resumed)):
        np.testing.assert_array_equal(a, b)


def test_counters_are_restored_not_restarted(tmp_path):
    """Starved layers make the counters non-zero; a resumed run must carry them."""
    backup = str(tmp_path / "b")
    model = keras.Sequential(
        [keras.Input((6, 6, 2))] + [keras.layers.Conv2D(4, 3, padding="same", use_bias=False) for _ in range(6)]
    )
    for layer in model.layers:  # all filters equal: no layer is locally weak
        layer.kernel.assign(np.ones(layer.kernel.shape, "float32"))
    model.layers[0].kernel.assign(np.full(model.layers[0].kernel.shape, 0.5, "float32"))
    # r = 0.5 * sigmoid(0) = 0.25 of 24 filters: the threshold is 1.0, so only
    # the first layer is below it, and it is starved (nothing locally weak).
    callback = keras_we.WeightEvolution(conv_ratio=0.5, backup_dir=backup)
    callback.set_model(model)
    callback.set_params({"epochs": 5})
    callback.on_train_begin()
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {})
    assert callback.get_state()["conv_counter"] == 1  # the evolution after epoch 0
    # A run resumed at epoch 2 takes the counters saved after epoch 1 and
    # evolves as the uninterrupted run does when epoch 2 begins (equal
    # filters: the crossover leaves the weights as they are).
    fresh = keras_we.WeightEvolution(conv_ratio=0.5, backup_dir=backup)
    fresh.set_model(model)
    fresh.on_train_begin()
    fresh.on_epoch_begin(2)
    callback.on_epoch_begin(2)
    assert fresh.get_state() == callback.get_state()
    assert fresh.get_state()["conv_counter"] == 2


def test_model_saved_mid_run_reloads_with_identical_weights(tmp_path):
    path = str(tmp_path / "mid.keras")

    class SaveAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.save(path)
                self.saved = kernels(self.model)

    model = small_cnn()
    saver = SaveAt()
    x, y = toy_data()
    model.fit(x, y, epochs=3, verbose=0, callbacks=[keras_we.WeightEvolution(), saver])
    reloaded = keras.saving.load_model(path)
    for a, b in zip(saver.saved, kernels(reloaded)):
        np.testing.assert_array_equal(a, b)
