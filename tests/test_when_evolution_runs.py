"""WE never writes after the last epoch that actually ran, whatever ended
`fit` (its epoch count, `EarlyStopping`, `stop_training` set mid-epoch as
`TerminateOnNaN` does, an exception) and in any order of the callbacks.

With a learning rate of 0 only WE changes the trainable weights, so after
`fit` they must equal `keras_we.evolve` applied by hand after each epoch
but the last that ran.
"""

import functools

import keras
import numpy as np
import pytest

import keras_we
from tests.utils import EndIn, Interrupt, small_cnn, toy_data

EPOCHS = 5


def trainable(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]


@functools.cache
def evolved_by_hand(epochs):
    """small_cnn's weights after evolutions following epochs 0 .. epochs-1."""
    model, state = small_cnn(), None
    for epoch in range(epochs):
        _, state = keras_we.evolve(model, epoch, state)
    return tuple(trainable(model))


@functools.cache
def compiled_model():
    """One model for all tests (its training step compiles once)."""
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=model.loss)
    return model, model.get_weights()


def fit(callbacks, **we):
    model, initial = compiled_model()
    model.set_weights(initial)
    x, y = toy_data()
    callbacks = [keras_we.WeightEvolution(**we) if c == "WE" else c for c in callbacks]
    try:
        history = model.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0, callbacks=callbacks)
        epochs_ran = len(history.history["loss"])
    except Interrupt:
        epochs_ran = None
    return model, epochs_ran


def assert_weights(model, expected, other):
    got = trainable(model)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The check can fail: one evolution more gives other weights.
    assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, other))


def orders(*callbacks):
    """WE first, then WE last in the callbacks list."""
    return [["WE", *callbacks], [*callbacks, "WE"]]


@pytest.mark.parametrize("order", range(2))
def test_early_stopping(order):
    # min_delta is never met, so EarlyStopping stops at the end of epoch 1.
    stopper = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=1)
    model, ran = fit(orders(stopper)[order])
    assert ran == 2
    assert_weights(model, evolved_by_hand(1), evolved_by_hand(2))


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("order", range(2))
def test_stop_training_in_any_order(tmp_path, mid_epoch, order):
    log = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    callbacks = orders(EndIn(2, mid_epoch, stop_training=True), log)[order]
    model, ran = fit(callbacks)
    assert ran == 3
    assert_weights(model, evolved_by_hand(2), evolved_by_hand(3))


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("order", range(2))
def test_exception_in_any_order(mid_epoch, order):
    model, ran = fit(orders(EndIn(2, mid_epoch))[order])
    assert ran is None
    # Epochs 0, 1 and (part of) 2 ran: evolutions after 0 and 1 only.
    assert_weights(model, evolved_by_hand(2), evolved_by_hand(3))


@pytest.mark.parametrize("order", range(2))
def test_evolve_last_epoch_means_the_last_that_ran(order):
    model, ran = fit(orders(EndIn(2, stop_training=True))[order], evolve_last_epoch=True)
    assert ran == 3
    assert_weights(model, evolved_by_hand(3), evolved_by_hand(2))


def test_full_run_evolves_after_every_epoch_but_the_last():
    model, ran = fit(["WE"])
    assert ran == EPOCHS
    assert_weights(model, evolved_by_hand(EPOCHS - 1), evolved_by_hand(EPOCHS))


def test_checkpoints_hold_the_validated_weights(tmp_path):
    """ModelCheckpoint (before or after WE) saves the weights of the epoch
    it names, before the evolution that follows it."""
    for order in orders("checkpoint"):
        path = str(tmp_path / "epoch{epoch}.weights.h5")
        checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
        fit([checkpoint if c == "checkpoint" else c for c in order])
        for epoch in (1, 3):
            saved = small_cnn()
            saved.load_weights(path.format(epoch=epoch + 1))
            assert_weights(saved, evolved_by_hand(epoch), evolved_by_hand(epoch + 1))
