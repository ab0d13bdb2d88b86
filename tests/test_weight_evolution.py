"""The `WeightEvolution` callback inside real `model.fit` runs."""

import csv
import json
import math

import keras
import numpy as np
import pytest

import keras_we
from tests.utils import evolve_after, kernels, small_cnn, toy_data


def test_fit_evolves_and_logs_figures(tmp_path):
    model = small_cnn()
    x, y = toy_data()
    csv_path = str(tmp_path / "log.csv")
    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[keras_we.WeightEvolution(), keras.callbacks.CSVLogger(csv_path)],
    )
    h = history.history
    for group in ("conv", "gamma", "beta"):
        assert len(h[f"we_{group}_evolved"]) == 3
        assert len(h[f"we_{group}_ratio"]) == 3
    # Each epoch logs the evolution that preceded it: none before epoch 0,
    # the ones after epochs 0 and 1 before epochs 1 and 2, none after the last.
    assert h["we_conv_evolved"][0] == 0 and h["we_changed_elements"][0] == 0
    assert h["we_conv_evolved"][1] >= 1 and h["we_conv_evolved"][2] >= 1
    # r(e) = 0.2 * 1 * sigmoid(e / 15), computed in float64.
    assert h["we_conv_ratio"][0] == 0.0
    assert h["we_conv_ratio"][1] == pytest.approx(0.1)
    assert h["we_conv_ratio"][2] == pytest.approx(0.2 / (1 + math.exp(-1 / 15)))
    assert h["we_gamma_ratio"][1] == pytest.approx(0.025)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert float(rows[1]["we_conv_evolved"]) == h["we_conv_evolved"][1]
    assert all(np.isfinite(w).all() for w in kernels(model))


def test_inferior_filters_change_and_dominant_filters_do_not():
    model = small_cnn()
    callback = keras_we.WeightEvolution(crossover="paper")
    callback.set_model(model)
    callback.on_train_begin()
    before = keras.ops.convert_to_numpy(model.layers[0].kernel).copy()
    evolve_after(callback, 0)
    after = keras.ops.convert_to_numpy(model.layers[0].kernel)
    changed = np.any(before != after, axis=(0, 1, 2))
    # The three weakened filters are the inferior ones; nothing else moves.
    assert changed[:3].all()
    assert not changed[3:].any()
    # Paper crossover moves one element per input channel towards the
    # dominant filter: 3 channels -> 3 changed values per inferior filter
    # (more only on exact ties).
    assert (before[..., :3] != after[..., :3]).sum() >= 9
    assert np.abs(after[..., :3]).sum() > np.abs(before[..., :3]).sum()


@pytest.mark.parametrize(
    "kwargs, evolved_epochs",
    [
        ({}, [0, 1, 2, 3]),
        ({"evolve_last_epoch": True}, [0, 1, 2, 3, 4]),
        ({"frequency": 2}, [0, 2]),
        ({"frequency": 2, "evolve_last_epoch": True}, [0, 2, 4]),
        ({"start_epoch": 2}, [2, 3]),
        ({"start_epoch": 1, "frequency": 3}, [1]),
    ],
)
def test_which_epochs_evolve(kwargs, evolved_epochs):
    """The epochs after which WE evolves, driven as `fit` drives callbacks."""
    model = small_cnn()
    callback = keras_we.WeightEvolution(**kwargs)
    callback.set_model(model)
    callback.set_params({"epochs": 5, "verbose": 0})
    seen, act = [], callback.act
    callback.act = lambda epoch: seen.append(epoch) or act(epoch)
    callback.on_train_begin()
    logged = []
    for epoch in range(5):
        logs = {}
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, logs)
        if logs["we_conv_ratio"] > 0:
            logged.append(epoch - 1)
    callback.on_train_end()
    assert seen == evolved_epochs
    # Logged in the epoch that follows; the one after the last epoch is not.
    assert logged == [e for e in evolved_epochs if e < 4]


def test_verbose_prints_one_line_per_evolution(capsys):
    model = small_cnn()
    x, y = toy_data()
    model.fit(x, y, epochs=3, verbose=0, callbacks=[keras_we.WeightEvolution(verbose=1)])
    lines = [l for l in capsys.readouterr().out.splitlines() if "Weight Evolution" in l]
    assert len(lines) == 2
    assert lines[0].startswith("Weight Evolution after epoch 1: evolved")


def test_state_round_trip_and_evolve_function_agree():
    model_a, model_b = small_cnn(), small_cnn()
    callback = keras_we.WeightEvolution()
    callback.set_model(model_a)
    callback.on_train_begin()
    state = None
    for epoch in range(3):
        evolve_after(callback, epoch)
        report, state = keras_we.evolve(model_b, epoch, state)
    assert callback.get_state() == state
    assert json.loads(json.dumps(state)) == state
    for a, b in zip(kernels(model_a), kernels(model_b)):
        np.testing.assert_array_equal(a, b)
    assert isinstance(report, keras_we.EvolutionReport)
    assert report.epoch == 2 and report.conv_evolved > 0
    callback.set_state({"conv_counter": 4, "gamma_counter": 1, "beta_counter": 0})
    assert callback.get_state()["conv_counter"] == 4
    with pytest.raises(ValueError, match="keys"):
        callback.set_state({"conv_counter": 1})
    with pytest.raises(ValueError, match="conv_counter"):
        callback.set_state({"conv_counter": -1, "gamma_counter": 0, "beta_counter": 0})


def test_backup_dir_restores_counters_of_the_resumed_epoch(tmp_path):
    model = small_cnn()
    # Evolves after epochs 0 and 4 only, so that the resumed epoch 3 begins
    # with the restored counters and no evolution.
    callback = keras_we.WeightEvolution(backup_dir=str(tmp_path), frequency=4)
    callback.set_model(model)
    callback.set_params({"epochs": 10})
    callback.on_train_begin()
    states = {}
    for epoch in range(4):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {})
        # Make the counters differ per epoch so the restore is visible.
        callback.set_state({"conv_counter": epoch + 1, "gamma_counter": 0, "beta_counter": 2})
        callback._write_backup(epoch)
        states[epoch] = callback.get_state()
    saved = json.load(open(tmp_path / "weight_evolution_state.json"))
    assert sorted(saved["states"]) == ["1", "2", "3"]
    resumed = keras_we.WeightEvolution(backup_dir=str(tmp_path), frequency=4)
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.on_epoch_begin(3)  # weights restored from after epoch 2
    assert resumed.get_state() == states[2]


def test_model_without_conv_kernels_warns_once_and_trains():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    model.compile("sgd", "mse")
    before = kernels(model)
    with pytest.warns(UserWarning, match="no trainable conv kernels") as record:
        history = model.fit(
            np.ones((8, 4)), np.ones((8, 3)), epochs=3, verbose=0,
            callbacks=[keras_we.WeightEvolution()],
        )
    assert len([w for w in record if "no trainable conv kernels" in str(w.message)]) == 1
    assert history.history["we_conv_evolved"] == [0, 0, 0]
    assert len(history.history["loss"]) == 3
    assert any((a != b).any() for a, b in zip(before, kernels(model)))  # SGD still trained


def test_nonfinite_kernel_is_skipped_and_reported():
    model = small_cnn()
    poisoned = keras.ops.convert_to_numpy(model.layers[3].kernel).copy()
    poisoned[0, 0, 0, 0] = np.nan
    model.layers[3].kernel.assign(poisoned)
    callback = keras_we.WeightEvolution()
    callback.set_model(model)
    callback.on_train_begin()
    with pytest.warns(RuntimeWarning, match="depthwise_conv2d"):
        logs = evolve_after(callback, 0)
    assert logs["we_skipped_nonfinite"] == 1
    # The other kernels still evolve: 8 + 16 filters left, r = 0.1, so the
    # global threshold is the third lowest score and two filters are below.
    assert logs["we_conv_evolved"] == 2
    after = keras.ops.convert_to_numpy(model.layers[3].kernel)
    np.testing.assert_array_equal(np.isnan(after), np.isnan(poisoned))
    np.testing.assert_array_equal(after[~np.isnan(after)], poisoned[~np.isnan(poisoned)])
    for w in kernels(model)[:2]:
        assert np.isfinite(w).all()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"conv_ratio": 1.5}, ValueError, ["conv_ratio", "1.5", "[0, 1]"]),
        ({"gamma_ratio": -0.1}, ValueError, ["gamma_ratio", "-0.1"]),
        ({"beta_ratio": float("nan")}, ValueError, ["beta_ratio", "nan"]),
        ({"local_ratio": "0.1"}, TypeError, ["local_ratio", "'0.1'"]),
        ({"conv_ratio": True}, TypeError, ["conv_ratio"]),
        ({"force_divisor": 0}, ValueError, ["force_divisor", "> 0"]),
        ({"force_divisor": -2}, ValueError, ["force_divisor"]),
        ({"crossover": "papers"}, ValueError, ["crossover", "'paper'", "'reference'"]),
        ({"schedule": 3}, TypeError, ["schedule", "callable"]),
        ({"frequency": 0}, ValueError, ["frequency", ">= 1"]),
        ({"frequency": 1.5}, TypeError, ["frequency"]),
        ({"start_epoch": -1}, ValueError, ["start_epoch"]),
        ({"evolve_last_epoch": "yes"}, TypeError, ["evolve_last_epoch"]),
        ({"backup_dir": 5}, TypeError, ["backup_dir"]),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        keras_we.WeightEvolution(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_schedule_output_and_evolve_options():
    model = small_cnn()
    with pytest.raises(ValueError, match="schedule"):
        keras_we.evolve(model, 0, schedule=lambda epoch: float("inf"))
    with pytest.raises(TypeError, match="frequency"):
        keras_we.evolve(model, 0, frequency=2)
    with pytest.raises(ValueError, match="epoch"):
        keras_we.evolve(model, -1)


def test_custom_schedule_and_zero_ratios():
    model = small_cnn()
    before = kernels(model)
    report, _ = keras_we.evolve(model, 0, schedule=lambda epoch: 0.0)
    assert report.conv_ratio == 0.0 and report.changed_elements == 0
    report, _ = keras_we.evolve(model, 3, conv_ratio=0.0, gamma_ratio=0.0, beta_ratio=0.0)
    assert report.changed_elements == 0
    for a, b in zip(before, kernels(model)):
        np.testing.assert_array_equal(a, b)
    report, _ = keras_we.evolve(model, 0, schedule=lambda epoch: 0.5)
    assert report.conv_ratio == pytest.approx(0.1)
    assert report.conv_evolved >= 3


def test_paper_schedule_values():
    schedule = keras_we.PaperSchedule()
    assert schedule(0) == 0.5
    assert schedule(59) == pytest.approx(1 / (1 + math.exp(-59 / 15)))
    assert schedule(60) == pytest.approx(0.4 * 0.5)
    assert schedule(130) == pytest.approx(0.2 / (1 + math.exp(-10 / 15)))
    imagenet = keras_we.PaperSchedule.imagenet()
    assert (imagenet.milestones, imagenet.factors, imagenet.temperature) == (
        (30, 60), (1.0, 0.5, 0.25), 8.0,
    )
    short = schedule.scaled(20)
    assert short.milestones == (6.0, 12.0) and short.temperature == 1.5
    with pytest.raises(ValueError, match="factors"):
        keras_we.PaperSchedule(factors=(1.0, 0.5))
    with pytest.raises(ValueError, match="milestones"):
        keras_we.PaperSchedule(milestones=(60, 30))
    with pytest.raises(ValueError, match="temperature"):
        keras_we.PaperSchedule(temperature=0)


def test_nested_model_and_separable_layers_are_found():
    inner = keras.Sequential(
        [keras.Input((8, 8, 4)), keras.layers.SeparableConv2D(6, 3, use_bias=False), keras.layers.BatchNormalization()],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv1D(4, 1)(keras.layers.Reshape((64, 3))(inputs))
    x = keras.layers.Reshape((8, 8, 4))(x)
    outputs = inner(x)
    model = keras.Model(inputs, outputs)
    from keras_we import layouts
    from keras_we.layers import find_targets

    assert [t.layout for t in find_targets(model)] == [
        layouts.REGULAR_KERNEL,  # Conv1D
        layouts.DEPTHWISE_KERNEL,  # separable: depthwise kernel first
        layouts.REGULAR_KERNEL,  # then pointwise
        layouts.GAMMA,
        layouts.BETA,
    ]
    separable = inner.layers[0]
    depthwise = keras.ops.convert_to_numpy(separable.depthwise_kernel).copy()
    depthwise[..., 0, 0] *= 1e-4  # filter 0: input channel 0, multiplier 0
    separable.depthwise_kernel.assign(depthwise)
    pointwise = keras.ops.convert_to_numpy(separable.pointwise_kernel).copy()
    pointwise[..., 0] *= 1e-4  # filter 0
    separable.pointwise_kernel.assign(pointwise)
    before = kernels(model)
    # 4 + 4 + 6 filters, r = 0.5 * sigmoid(10 / 15): four below the threshold.
    report, state = keras_we.evolve(model, 10, conv_ratio=0.5)
    moved = {
        w.path: bool((a != b).any())
        for w, a, b in zip(model.weights, before, kernels(model))
    }
    assert moved[separable.depthwise_kernel.path]
    assert moved[separable.pointwise_kernel.path]
    assert report.conv_evolved >= 2
    assert set(state) == {"conv_counter", "gamma_counter", "beta_counter"}


def test_evolved_weights_survive_the_training_loop():
    """With a zero learning rate, fit + callback equals evolve() by hand: the
    backends' training loops (JAX keeps its own copy of the state) keep what
    the callback wrote."""
    fitted, by_hand = small_cnn(), small_cnn()
    fitted.compile(optimizer=keras.optimizers.SGD(0.0), loss=fitted.loss)
    x, y = toy_data()
    fitted.fit(x, y, epochs=3, verbose=0, callbacks=[keras_we.WeightEvolution(evolve_last_epoch=True)])
    state = None
    for epoch in range(3):
        _, state = keras_we.evolve(by_hand, epoch, state)
    for a, b in zip(fitted.trainable_weights, by_hand.trainable_weights):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6, atol=1e-7
        )
    assert any(
        (keras.ops.convert_to_numpy(a) != keras.ops.convert_to_numpy(b)).any()
        for a, b in zip(small_cnn().trainable_weights, by_hand.trainable_weights)
    )


def test_evolver_is_shared_and_lets_the_model_go():
    """`evolve()` and callbacks share one compiled evolver per model (a
    second `fit` does not compile again), and the cache does not keep a
    model alive."""
    import gc
    import weakref

    from keras_we.evolution import EvolutionOptions, evolver_for

    model = small_cnn()
    x, y = toy_data()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keras_we.WeightEvolution()])
    evolver = evolver_for(model, EvolutionOptions())
    keras_we.evolve(model, 3)
    assert evolver_for(model, EvolutionOptions()) is evolver
    assert evolver_for(model, EvolutionOptions(crossover="paper")) is not evolver
    alive = weakref.ref(model)
    del model, evolver
    gc.collect()
    assert alive() is None
