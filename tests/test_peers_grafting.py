"""External filter grafting (`entropy`, `grafting_coefficient`, `graft`,
`fit_grafted`): hand-worked numbers, the ring's pre-graft snapshot, frozen
and non-finite variables, real lockstep `fit` runs and exact resumption."""

import math
import os

import keras
import numpy as np
import pytest

from keras_we.peers import entropy, fit_grafted, graft, grafting_coefficient
from keras_we.peers.grafting import learning_rates
from tests.utils import EndIn, Interrupt, kernels, tiny_cnn, toy_data

# tiny_cnn's weights in traversal order (model.weights), all grafted:
#   0 conv kernel (3,3,3,8)     segment 0
#   1-4 BN gamma, beta, moving mean, moving variance (8,)   segment 0
#   5 depthwise kernel (3,3,8,1)   segment 1
#   6-9 BN gamma, beta, moving mean, moving variance (8,)   segment 1
#   10 1x1 conv kernel (1,1,8,16)   segment 2
#   11-12 Dense kernel (16,3), bias (3,)   segment 2
CONV0, GAMMA1, BETA1, MOVING_VAR1, DEPTHWISE, MOVING_MEAN2, CONV2, DENSE = 0, 1, 2, 4, 5, 8, 10, 11

HALF_LN2 = 0.5 * math.log(2)  # H of a tensor holding two values, half each


def two_valued(shape, low=0.0, high=1.0):
    """Half `low`, half `high`: one bin holds half the values, the max is
    in no bin, so H = -0.5 log 0.5 = log(2) / 2."""
    flat = np.where(np.arange(int(np.prod(shape))) % 2 == 0, low, high)
    return flat.reshape(shape).astype("float32")


def values(model):
    return kernels(model)  # numpy copies of model.weights, in order


def set_weight(model, index, value):
    weight = model.weights[index]
    weight.assign(np.broadcast_to(np.asarray(value, "float32"), weight.shape))


# ------------------------------------------------------------------ entropy


def test_entropy_counts_bins_from_min_and_leaves_the_max_out():
    # min 0, max 10, scale (10 - 0) / 10 = 1: bins [0,1), [1,2), ..., [9,10).
    #   [0,1): 0, 0, 0 -> 3    [1,2): 1, 1 -> 2 (a value on an edge goes up)
    #   [2,3): 2.5 -> 1   [5,6): 5 -> 1   [7,8): 7 -> 1   [9,10): 9.5 -> 1
    #   10 (the max) in no bin; p = count / 10 (the max still counts in n).
    # H = -(0.3 ln 0.3 + 0.2 ln 0.2 + 4 * 0.1 ln 0.1)
    #   = 0.361192 + 0.321888 + 0.921034 = 1.604113
    x = np.array([[0, 0, 0, 1, 1], [2.5, 5, 7, 9.5, 10]], "float32")
    assert entropy(x) == pytest.approx(1.604113, abs=1e-6)
    # bins=2, scale 5: [0,5): 0,0,0,1,1,2.5 -> 6; [5,10): 5,7,9.5 -> 3; 10 none.
    # H = -(0.6 ln 0.6 + 0.3 ln 0.3) = 0.306495 + 0.361192 = 0.667687
    assert entropy(x, bins=2) == pytest.approx(0.667687, abs=1e-6)


def test_entropy_of_two_values_constant_and_nonfinite_tensors():
    assert entropy(np.array([0.0, 1.0], "float32")) == pytest.approx(HALF_LN2, rel=1e-6)
    assert entropy(two_valued((3, 3, 3, 8), 0.25, 2.0)) == pytest.approx(HALF_LN2, rel=1e-6)
    # Constant: scale 0, every bin [min, min) is empty.
    assert entropy(np.full((4, 5), 3.5, "float32")) == 0.0
    assert math.isnan(entropy(np.array([0.0, np.nan, 1.0], "float32")))
    assert isinstance(entropy(np.array([0.0, 1.0])), float)


def test_entropy_rejects_bad_bins():
    with pytest.raises(ValueError, match="`bins`"):
        entropy(np.ones(3), bins=0)
    with pytest.raises(TypeError, match="`bins`"):
        entropy(np.ones(3), bins=2.5)


# ------------------------------------------------------------------ coefficient


TWO = np.array([0.0, 1.0], "float32")  # H = ln(2) / 2 = 0.346574
FLAT = np.zeros(6, "float32")  # H = 0


def test_coefficient_saturates_with_the_default_steepness():
    # c * dH = 500 * 0.346574 = 173.287; arctan = pi/2 - 0.005771 = 1.565025;
    # 0.4 / pi * 1.565025 = 0.199265; w = round(0.699265, 2) = 0.7.
    assert grafting_coefficient(TWO, FLAT) == 0.7
    assert grafting_coefficient(FLAT, TWO) == 0.3  # round(0.300735, 2)
    assert grafting_coefficient(TWO, TWO) == 0.5  # arctan(0) = 0
    # a = 1, c = 1e6: arctan(346574) = pi/2 - 3e-6; w = round(0.999999, 2) = 1.0.
    assert grafting_coefficient(TWO, FLAT, a=1, c=1e6) == 1.0
    assert isinstance(grafting_coefficient(TWO, FLAT), float)


def test_coefficient_is_rounded_to_two_decimals():
    # c = 1: arctan(0.346574) = 0.333619; 0.4 / pi * 0.333619 = 0.042478;
    # w = round(0.542478, 2) = 0.54, and round(0.457522, 2) = 0.46.
    assert grafting_coefficient(TWO, FLAT, c=1) == 0.54
    assert grafting_coefficient(FLAT, TWO, c=1) == 0.46
    # a = 0.2, c = 2: arctan(0.693147) = 0.606112; 0.2 / pi * 0.606112 =
    # 0.038586; w = round(0.538586, 2) = 0.54.
    assert grafting_coefficient(TWO, FLAT, a=0.2, c=2) == 0.54


def test_coefficient_rounds_as_numpy_rounds():
    # c = 1e30: arctan(1e30 * 0.346574) is pi/2 in float64, so with a = 0.29
    # w = 0.29 / pi * (pi / 2) + 0.5 = 0.645 (the float64 0.64500000000000001776).
    # Python's round of that float is correctly rounded: 0.65. The public code
    # rounds a NumPy float64: 0.645 * 100 = 64.5, half to even -> 64 -> 0.64.
    value = 0.29 / np.pi * np.arctan(1e30 * HALF_LN2) + 0.5
    assert round(float(value), 2) == 0.65
    assert grafting_coefficient(TWO, FLAT, a=0.29, c=1e30) == 0.64


@pytest.mark.parametrize("kwargs, error, name", [
    ({"a": 1.5}, ValueError, "`a`"), ({"a": -0.1}, ValueError, "`a`"),
    ({"a": "0.4"}, TypeError, "`a`"), ({"c": -1}, ValueError, "`c`"),
    ({"c": float("inf")}, ValueError, "`c`"),
])
def test_coefficient_rejects_bad_a_and_c(kwargs, error, name):
    with pytest.raises(error, match=name):
        grafting_coefficient(TWO, FLAT, **kwargs)


def test_learning_rates_follow_the_public_cosine():
    assert learning_rates(0.1, 2) == pytest.approx([0.05, 0.1], abs=1e-15)
    # (1 + cos(pi * 3/4)) / 2 = 0.146447, (1 + cos(pi/2)) / 2 = 0.5,
    # (1 + cos(pi/4)) / 2 = 0.853553, (1 + cos 0) / 2 = 1.
    assert learning_rates(1.0, 4) == pytest.approx([0.146447, 0.5, 0.853553, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="`k`"):
        learning_rates(0.1, 1)
    with pytest.raises(ValueError, match="`lr`"):
        learning_rates(0.0, 2)


# ------------------------------------------------------------------ graft


def hand_pair():
    """Two tiny_cnn whose segments have entropies worked out by hand."""
    a, b = tiny_cnn(0), tiny_cnn(1)
    set_weight(a, CONV0, two_valued((3, 3, 3, 8)))  # H ln2/2
    set_weight(b, CONV0, 0.5)  # H 0         -> w_a = 0.7, w_b = 0.3
    set_weight(a, DEPTHWISE, 1.0)
    set_weight(b, DEPTHWISE, 3.0)  # both H 0 -> w = 0.5
    set_weight(a, CONV2, 0.25)
    set_weight(b, CONV2, two_valued((1, 1, 8, 16), 0.0, 2.0))  # -> w_a = 0.3, w_b = 0.7
    set_weight(a, GAMMA1, 2.0)
    set_weight(b, GAMMA1, 1.0)
    set_weight(a, BETA1, 1.0)
    set_weight(b, BETA1, -1.0)
    set_weight(a, MOVING_VAR1, 4.0)
    set_weight(b, MOVING_VAR1, 1.0)
    set_weight(a, MOVING_MEAN2, 1.0)
    set_weight(b, MOVING_MEAN2, 3.0)
    set_weight(a, DENSE, 1.0)
    set_weight(b, DENSE, 0.0)
    return a, b


def test_two_networks_graft_by_hand_and_end_identical():
    a, b = hand_pair()
    reports = graft([a, b])
    assert reports[0].coefficients == (0.7, 0.5, 0.3)
    assert reports[1].coefficients == (0.3, 0.5, 0.7)
    assert reports[0].to_logs() == {"graft_coefficient_mean": 0.5, "graft_skipped_nonfinite": 0}
    after_a, after_b = values(a), values(b)
    # conv 0: 0.7 * {0, 1} + 0.3 * 0.5 = {0.15, 0.85} (b: 0.3 * 0.5 + 0.7 * {0, 1}).
    np.testing.assert_allclose(after_a[CONV0], two_valued((3, 3, 3, 8), 0.15, 0.85), rtol=1e-6)
    # BN after conv 0 takes conv 0's w: gamma 0.7 * 2 + 0.3 * 1 = 1.7,
    # moving variance 0.7 * 4 + 0.3 * 1 = 3.1.
    np.testing.assert_allclose(after_a[GAMMA1], 1.7, rtol=1e-6)
    np.testing.assert_allclose(after_a[MOVING_VAR1], 3.1, rtol=1e-6)
    # Depthwise: 0.5 * 1 + 0.5 * 3 = 2; its BN's moving mean 0.5 * 1 + 0.5 * 3 = 2.
    np.testing.assert_allclose(after_a[DEPTHWISE], 2.0, rtol=1e-6)
    np.testing.assert_allclose(after_a[MOVING_MEAN2], 2.0, rtol=1e-6)
    # 1x1 conv: 0.3 * 0.25 + 0.7 * {0, 2} = {0.075, 1.475}; the Dense kernel
    # after it takes its w: 0.3 * 1 + 0.7 * 0 = 0.3.
    np.testing.assert_allclose(after_a[CONV2], two_valued((1, 1, 8, 16), 0.075, 1.475), rtol=1e-6)
    np.testing.assert_allclose(after_a[DENSE], 0.3, rtol=1e-6)
    # Its beta: 0.7 * 1 + 0.3 * (-1) = 0.4.
    np.testing.assert_allclose(after_a[BETA1], 0.4, rtol=1e-6)
    # K = 2: w_b = 1 - w_a, so both networks now hold the same weights.
    for x, y in zip(after_a, after_b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_two_random_networks_end_identical_and_coefficients_sum_to_one():
    a, b = tiny_cnn(0), tiny_cnn(1)
    before_a, before_b = values(a), values(b)
    reports = graft([a, b])
    for w_a, w_b in zip(reports[0].coefficients, reports[1].coefficients):
        assert w_a + w_b == pytest.approx(1.0)
    segments = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    for index, (x, y) in enumerate(zip(values(a), values(b))):
        w = reports[0].coefficients[segments[index]]
        np.testing.assert_allclose(x, w * before_a[index] + (1 - w) * before_b[index], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_a_ring_of_three_grafts_the_pre_graft_snapshot():
    models = [tiny_cnn(0), tiny_cnn(1), tiny_cnn(2)]
    for model, kernel, gamma in zip(models, [two_valued((3, 3, 3, 8)), 2.0, 4.0], [1.0, 2.0, 4.0]):
        set_weight(model, CONV0, kernel)
        set_weight(model, GAMMA1, gamma)
    reports = graft(models)
    assert [r.coefficients[0] for r in reports] == [0.7, 0.3, 0.5]
    conv = [values(m)[CONV0] for m in models]
    gamma = [values(m)[GAMMA1] for m in models]
    # Network 0 takes network 2: 0.7 * {0, 1} + 0.3 * 4 = {1.2, 1.9}; gamma 0.7 + 1.2 = 1.9.
    np.testing.assert_allclose(conv[0], two_valued((3, 3, 3, 8), 1.2, 1.9), rtol=1e-6)
    np.testing.assert_allclose(gamma[0], 1.9, rtol=1e-6)
    # Network 1 takes network 0 as it was before its graft:
    # 0.3 * 2 + 0.7 * {0, 1} = {0.6, 1.3}; gamma 0.3 * 2 + 0.7 * 1 = 1.3
    # (grafted network 0 would give {1.44, 1.93} and 1.93).
    np.testing.assert_allclose(conv[1], two_valued((3, 3, 3, 8), 0.6, 1.3), rtol=1e-6)
    np.testing.assert_allclose(gamma[1], 1.3, rtol=1e-6)
    # Network 2 takes network 1 as it was: 0.5 * 4 + 0.5 * 2 = 3 (kernel and gamma).
    np.testing.assert_allclose(conv[2], 3.0, rtol=1e-6)
    np.testing.assert_allclose(gamma[2], 3.0, rtol=1e-6)


def dropout_cnn(seed):
    """tiny_cnn with a Dropout (an integer seed state) after the first BatchNorm."""
    model = tiny_cnn(seed)
    layers = model.layers
    model = keras.Sequential([keras.Input((8, 8, 3)), *layers[:2], keras.layers.Dropout(0.5), *layers[2:]])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_frozen_layers_optimizer_state_and_integer_variables_are_untouched():
    models = [dropout_cnn(0), dropout_cnn(1)]
    for i, model in enumerate(models):
        model.optimizer.build(model.trainable_variables)
        for v in model.optimizer.variables:  # momentum that differs between the two
            if keras.backend.is_float_dtype(v.dtype):
                v.assign(np.full(v.shape, 0.5 + i, "float32"))
        model.layers[1].trainable = False  # the first BatchNorm
        model.layers[4].trainable = False  # the depthwise conv
    frozen = [[keras.ops.convert_to_numpy(v).copy() for v in m.layers[1].weights + m.layers[4].weights]
              for m in models]
    optimizer = [[keras.ops.convert_to_numpy(v).copy() for v in m.optimizer.variables] for m in models]
    integers = [[keras.ops.convert_to_numpy(v).copy() for v in m.variables
                 if not keras.backend.is_float_dtype(v.dtype)] for m in models]
    assert integers[0]  # the Dropout's seed state
    conv_before = [values(m)[0] for m in models]
    reports = graft(models)
    assert len(reports[0].coefficients) == 2  # the frozen depthwise kernel is left out
    for i, model in enumerate(models):
        after = [keras.ops.convert_to_numpy(v) for v in model.layers[1].weights + model.layers[4].weights]
        for x_before, x_after in zip(frozen[i], after):
            np.testing.assert_array_equal(x_before, x_after)
        for x_before, v in zip(optimizer[i], model.optimizer.variables):
            np.testing.assert_array_equal(x_before, keras.ops.convert_to_numpy(v))
        now = [keras.ops.convert_to_numpy(v) for v in model.variables
               if not keras.backend.is_float_dtype(v.dtype)]
        for x_before, x_after in zip(integers[i], now):
            np.testing.assert_array_equal(x_before, x_after)
        assert not np.array_equal(values(model)[0], conv_before[i])  # the trainable conv grafted
    # The second BatchNorm (trainable) is grafted, moving statistics included.
    second = [[keras.ops.convert_to_numpy(v) for v in m.layers[5].weights] for m in models]
    for x_a, x_b in zip(*second):
        np.testing.assert_allclose(x_a, x_b, rtol=1e-6, atol=1e-7)


def test_a_nonfinite_segment_is_left_alone_and_reported():
    a, b = tiny_cnn(0), tiny_cnn(1)
    poisoned = values(b)[CONV0]
    poisoned[0, 0, 0, 0] = np.nan
    set_weight(b, CONV0, poisoned)
    before_a, before_b = values(a), values(b)
    reports = graft([a, b])
    for report in reports:
        assert report.skipped_nonfinite == 1
        assert report.coefficients[0] == 1.0
    after_a, after_b = values(a), values(b)
    for index in range(5):  # segment 0: conv 0 and its BatchNorm, in both
        np.testing.assert_array_equal(after_a[index], before_a[index])
        np.testing.assert_array_equal(after_b[index], before_b[index])
    assert all(np.all(np.isfinite(x)) for x in after_a)
    for index in range(5, 13):  # the other segments grafted
        np.testing.assert_allclose(after_a[index], after_b[index], rtol=1e-6, atol=1e-6)
    for index in (DEPTHWISE, CONV2, DENSE):  # (BatchNorm starts alike in both)
        assert not np.array_equal(after_a[index], before_a[index])


def wider_cnn(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


def test_graft_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`models`"):
        graft([tiny_cnn(0)])
    with pytest.raises(ValueError, match="`models`"):
        graft([tiny_cnn(0), wider_cnn(1)])
    m = tiny_cnn(0)
    with pytest.raises(ValueError, match="`models`"):
        graft([m, m])
    with pytest.raises(TypeError, match="`models`"):
        graft(tiny_cnn(0))
    with pytest.raises(ValueError, match="`a`"):
        graft([tiny_cnn(0), tiny_cnn(1)], a=2)
    with pytest.raises(ValueError, match="`c`"):
        graft([tiny_cnn(0), tiny_cnn(1)], c=-5)
    dense = [keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]) for _ in range(2)]
    with pytest.raises(ValueError, match="conv kernel"):
        graft(dense)


# ------------------------------------------------------------------ fit_grafted


def compiled_pair(seeds=(0, 1), lr=0.1):
    models = []
    for seed, rate in zip(seeds, learning_rates(lr, 2)):
        model = tiny_cnn(seed)
        model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        models.append(model)
    return models


class Record(keras.callbacks.Callback):
    """The model's weights as each epoch begins and ends."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = {}, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.begin[epoch] = values(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.end[epoch] = values(self.model)


def test_fit_grafted_trains_in_lockstep_and_grafts_between_epochs():
    models = compiled_pair()
    x, y = toy_data(32)
    records = [Record(), Record()]
    histories = fit_grafted(
        models, [x, x[::-1]], [y, y[::-1]], epochs=3, batch_size=8, shuffle=False,
        validation_data=toy_data(8, seed=1),  # a shared (x, y) tuple, though K = 2
        callbacks=[[records[0]], [records[1]]], verbose=0)
    for history in histories:
        assert history.epoch == [0, 1, 2]
        assert len(history.history["loss"]) == len(history.history["val_loss"]) == 3
        assert history.history["graft_skipped_nonfinite"] == [0, 0, 0]
        assert history.history["graft_coefficient_mean"][0] == 0.0
    for epoch in (1, 2):
        w_0 = histories[0].history["graft_coefficient_mean"][epoch]
        w_1 = histories[1].history["graft_coefficient_mean"][epoch]
        assert 0.3 <= w_0 <= 0.7 and w_0 + w_1 == pytest.approx(1.0)
        # The graft after epoch - 1: both networks begin the epoch with the same weights.
        for x_0, x_1 in zip(records[0].begin[epoch], records[1].begin[epoch]):
            np.testing.assert_allclose(x_0, x_1, rtol=1e-5, atol=1e-6)
        assert any(not np.array_equal(a, b) for a, b in
                   zip(records[0].begin[epoch], records[0].end[epoch - 1]))
    # No graft after the last epoch: each network holds what it trained, and
    # the two differ (learning rates 0.05 and 0.1).
    for model, record in zip(models, records):
        for final, trained in zip(values(model), record.end[2]):
            np.testing.assert_array_equal(final, trained)
    assert any(not np.allclose(a, b) for a, b in zip(values(models[0]), values(models[1])))

    # A network that stops training (EarlyStopping, TerminateOnNaN) ends the
    # run for all after that epoch, without a graft.
    records = [Record(), Record()]
    histories = fit_grafted(models, x, y, epochs=3, batch_size=8, verbose=0, callbacks=[
        [records[0], EndIn(0, stop_training=True)], [records[1]]])
    assert [h.epoch for h in histories] == [[0], [0]]
    for model, record in zip(models, records):
        for final, trained in zip(values(model), record.end[0]):
            np.testing.assert_array_equal(final, trained)


def deterministic():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def run(backup_dir, epochs, seeds=(0, 1)):
    models = compiled_pair(seeds)
    x, y = toy_data(32)
    histories = fit_grafted(models, x, y, epochs=epochs, batch_size=8, shuffle=False,
                            backup_dir=backup_dir, verbose=0)
    return models, histories


def test_an_interrupted_run_resumes_bit_identically(tmp_path):
    deterministic()
    straight, straight_histories = run(None, 4)

    backup = str(tmp_path / "backup")
    interrupted = compiled_pair()
    x, y = toy_data(32)
    kwargs = dict(batch_size=8, shuffle=False, backup_dir=backup, verbose=0)
    with pytest.raises(Interrupt):  # network 1 crashes at the end of epoch 2
        fit_grafted(interrupted, x, y, epochs=4, callbacks=[[], [EndIn(2)]], **kwargs)
    assert os.path.exists(os.path.join(backup, "grafting_state.json"))
    # The same models (network 0 trained epoch 2): the backup after epoch 1 is loaded.
    histories = fit_grafted(interrupted, x, y, epochs=3, **kwargs)
    assert histories[0].epoch == [0, 1, 2]
    # Fresh models of other initial weights, optimizers not built: everything
    # comes from the backup; the run that ended at its last epoch grafts and goes on.
    resumed, histories = run(backup, 4, seeds=(7, 8))
    for model, twin in zip(straight, resumed):
        for a, b in zip(values(model), values(twin)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(model.optimizer.variables, twin.optimizer.variables):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    for history, twin in zip(straight_histories, histories):
        assert twin.epoch == [0, 1, 2, 3]
        assert twin.history == history.history


def test_fit_grafted_rejects_bad_arguments():
    x, y = toy_data(8)
    models = compiled_pair()
    with pytest.raises(ValueError, match="`models`"):
        fit_grafted(models[:1], x, y, epochs=1)
    with pytest.raises(ValueError, match="`callbacks`"):
        fit_grafted(models, x, y, epochs=1, callbacks=[[]])
    with pytest.raises(ValueError, match="`callbacks`"):
        fit_grafted(models, x, y, epochs=1, callbacks=[Record(), Record()])
    with pytest.raises(ValueError, match="`epochs`"):
        fit_grafted(models, x, y, epochs=0)
    with pytest.raises(ValueError, match="`a`"):
        fit_grafted(models, x, y, epochs=1, a=1.2)
    with pytest.raises(ValueError, match="`c`"):
        fit_grafted(models, x, y, epochs=1, c=-1)
    with pytest.raises(ValueError, match="`initial_epoch`"):
        fit_grafted(models, x, y, epochs=2, initial_epoch=1)
    other = wider_cnn(2)
    other.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="`models`"):
        fit_grafted([models[0], other], x, y, epochs=1)
    with pytest.raises(ValueError, match=r"`models\[1\]` is not compiled"):
        fit_grafted([models[0], tiny_cnn(3)], x, y, epochs=1)
    for model in models:  # nothing trained
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
