"""Filter grafting's single-network variants, `NoiseGrafting` and
`InternalGrafting`: hand-worked numbers, the public code's sequential
semantics, and real `model.fit` runs."""

import keras
import numpy as np
import pytest

from keras_we.peers import InternalGrafting, NoiseGrafting
from keras_we.peers.noise_grafting import noise_seed
from tests.utils import LayerStack, kernels, small_cnn, toy_data


def conv_model(*kernel_values, depthwise=False):
    """A model holding one bias-free conv layer per kernel `(kh, kw, C, O)`
    (`(kh, kw, C, M)` for depthwise), with exactly those values."""
    layers = []
    for k in kernel_values:
        kh, kw, channels, out = np.shape(k)
        if depthwise:
            layer = keras.layers.DepthwiseConv2D((kh, kw), depth_multiplier=out, use_bias=False)
        else:
            layer = keras.layers.Conv2D(out, (kh, kw), use_bias=False)
        layer.build((None, 4, 4, channels))
        layer.kernel.assign(np.asarray(k, "float32"))
        layers.append(layer)
    return LayerStack(layers)


def convs(model):
    return model.stack


def one_by_one(*filters):
    """A 1x1 Conv2D kernel `(1, 1, C, O)` whose filter `o` is `filters[o]`."""
    return np.asarray(filters, "float32").T[None, None]


def acted(callback, model, epoch):
    callback.set_model(model)
    logs = callback.act(epoch)
    return logs, [keras.ops.convert_to_numpy(layer.kernel) for layer in convs(model)]


# Four filters of a 1x1 kernel with two input channels; threshold 0.5:
#   f0 = [0.125, -0.125]  L1 0.25  weak
#   f1 = [0.25, 0.25]     L1 0.5   at the threshold: not weak
#   f2 = [0, 0]           L1 0     weak
#   f3 = [1, -2]          L1 3
FOUR = one_by_one([0.125, -0.125], [0.25, 0.25], [0.0, 0.0], [1.0, -2.0])


# ------------------------------------------------------------------ NoiseGrafting


@pytest.mark.parametrize("decay, epoch, scale", [(0.5, 2, 0.25), (0.975, 0, 1.0), (0.975, 3, 0.975**3)])
def test_noise_goes_to_the_weak_filters_scaled_by_decay_to_the_epoch(decay, epoch, scale):
    logs, [after] = acted(NoiseGrafting(threshold=0.5, decay=decay, seed=7), conv_model(FOUR), epoch)
    assert logs == {"graft_noise_filters": 2, "graft_noise_scale": pytest.approx(scale),
                    "graft_noise_skipped_nonfinite": 0}
    # f1 (at the threshold) and f3 are untouched, exactly.
    np.testing.assert_array_equal(after[..., [1, 3]], FOUR[..., [1, 3]])
    # f0 and f2 get scale * N(0, 1), row o of the noise drawn for kernel 0
    # (one row per filter, its values channel by channel).
    noise = keras.ops.convert_to_numpy(keras.random.normal((4, 2), seed=noise_seed(7, epoch, 0)))
    delta = after[0, 0] - FOUR[0, 0]  # (C, O)
    np.testing.assert_allclose(delta[:, [0, 2]], scale * noise[[0, 2]].T, rtol=1e-5, atol=1e-7)
    assert np.all(delta[:, [0, 2]] != 0)


def test_noise_is_reproducible_from_seed_epoch_and_kernel():
    def run(seed, epoch):
        return acted(NoiseGrafting(threshold=0.5, seed=seed), conv_model(FOUR, FOUR), epoch)[1]

    first, second = run(3, 4)
    again = run(3, 4)  # a fresh callback: nothing carried but the seed
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])
    # The two kernels held the same values but draw their own noise; so do
    # other epochs and other seeds.
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, run(3, 5)[0])
    assert not np.array_equal(first, run(4, 4)[0])


def test_noise_seed_drawn_once_when_none():
    callback = NoiseGrafting()
    assert isinstance(callback.seed, int) and callback.seed >= 0
    first = acted(callback, conv_model(FOUR), 1)[1]
    np.testing.assert_array_equal(first, acted(callback, conv_model(FOUR), 1)[1])


# --------------------------------------------------------------- InternalGrafting

# Hand-worked, threshold 0.5 on FOUR: order by L1 = f2 (0), f0 (0.25),
# f1 (0.5), f3 (3). j=0: f2 += f3 -> [1, -2]; j=1: f0 += f1 -> [0.375, 0.125];
# j=2: f1 is at the threshold: stop.
FOUR_GRAFTED = one_by_one([0.375, 0.125], [0.25, 0.25], [1.0, -2.0], [1.0, -2.0])

# More than half weak, even n, threshold 1:
#   g0 = [0.25, 0] (0.25), g1 = [0.125, -0.125] (0.25, tied with g0: after it),
#   g2 = [0, 0.5] (0.5), g3 = [1, 1] (2). order g0, g1, g2, g3.
#   j=0: g0 += g3 -> [1.25, 1]; j=1: g1 += g2 -> [0.125, 0.375];
#   j=2: g2 (0.5 < 1) += g1, already grafted -> [0.125, 0.875]
#        (closed form: 2 * g2 + g1); j=3: g3 is strong: stop.
EVEN = one_by_one([0.25, 0.0], [0.125, -0.125], [0.0, 0.5], [1.0, 1.0])
EVEN_GRAFTED = one_by_one([1.25, 1.0], [0.125, 0.375], [0.125, 0.875], [1.0, 1.0])

# All weak, odd n, threshold 10:
#   h0 = [0.25, 0] (0.25), h1 = [0.5, 0.25] (0.75), h2 = [-1, 0.5] (1.5).
#   j=0: h0 += h2 -> [-0.75, 0.5]; j=1: the middle adds itself: h1 -> [1, 0.5];
#   j=2: h2 += h0, already grafted -> [-1.75, 1] (closed form: 2 * h2 + h0).
ODD = one_by_one([0.25, 0.0], [0.5, 0.25], [-1.0, 0.5])
ODD_GRAFTED = one_by_one([-0.75, 0.5], [1.0, 0.5], [-1.75, 1.0])


@pytest.mark.parametrize("kernel, threshold, grafted, count", [
    (FOUR, 0.5, FOUR_GRAFTED, 2),
    (EVEN, 1.0, EVEN_GRAFTED, 3),
    (ODD, 10.0, ODD_GRAFTED, 3),
    (FOUR, 0.0, FOUR, 0),
])
def test_internal_grafting_hand_worked(kernel, threshold, grafted, count):
    logs, [after] = acted(InternalGrafting(threshold=threshold), conv_model(kernel), 0)
    assert logs == {"graft_internal_filters": count, "graft_internal_skipped_nonfinite": 0}
    np.testing.assert_array_equal(after, grafted)


def replay_inside(rows, threshold):
    """The public code's `inside()` on one kernel's filter rows, step by step
    in place, in float64."""
    u = np.array(rows, "float64")
    n = len(u)
    order = np.argsort(np.abs(u).sum(axis=1), kind="stable")
    for j in range(n):
        if np.abs(u[order[j]]).sum() < threshold:
            u[order[j]] += u[order[n - 1 - j]]  # the same row when j = n-1-j: doubles
        else:
            break
    return u


@pytest.mark.parametrize("n, weak, depthwise", [
    (6, 4, False), (7, 7, False), (7, 5, True),
])
def test_internal_grafting_matches_the_sequential_loop(n, weak, depthwise):
    rng = np.random.default_rng(n * 10 + weak)
    # Filters as rows of 18 (3x3x2) or 9 (depthwise 3x3) values; `weak` of
    # them with an L1 norm of at most 0.09 (< 0.1), the others above 1.
    width = 9 if depthwise else 18
    rows = rng.uniform(-1, 1, (n, width))
    rows[:weak] *= rng.uniform(0.1, 1.0, (weak, 1)) * (0.09 / width)
    rows = rng.permutation(rows)
    if depthwise:  # filter c * M + m is kernel[:, :, c, m]
        shape = (3, 3, n // 2, 2) if n % 2 == 0 else (3, 3, n, 1)
        kernel = rows.T.reshape(shape)
    else:
        kernel = rows.T.reshape(3, 3, 2, n)
    logs, [after] = acted(InternalGrafting(threshold=0.1), conv_model(kernel, depthwise=depthwise), 0)
    assert logs["graft_internal_filters"] == weak
    expected = replay_inside(kernel.astype("float32").reshape(-1, n).T, 0.1)
    np.testing.assert_allclose(after.reshape(-1, n).T, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- both


def noise():
    return NoiseGrafting(seed=0)


def internal():
    return InternalGrafting()


class Snapshot(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.kernels = kernels(self.model)


@pytest.mark.parametrize("make, prefix", [(noise, "graft_noise"), (internal, "graft_internal")])
def test_fit_grafts_between_epochs_only(make, prefix):
    model = small_cnn()  # its first conv has three nearly dead filters (L1 ~ 0.005)
    # A small learning rate keeps them below the threshold 0.1 through epoch 0.
    model.compile(optimizer=keras.optimizers.SGD(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = toy_data()
    snapshot = Snapshot()
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[make(), snapshot])
    h = history.history
    # Epoch 0 follows no grafting; before epoch 1 the three dead filters
    # were grafted (noise ~ N(0, 1) on 27 values, or a strong filter added),
    # so before epoch 2 none is weak.
    assert h[f"{prefix}_filters"] == [0, 3, 0]
    assert h[f"{prefix}_skipped_nonfinite"] == [0, 0, 0]
    if prefix == "graft_noise":
        assert h["graft_noise_scale"] == pytest.approx([0.0, 1.0, 0.975])
    # Nothing after the last epoch: the model holds what it last trained.
    for saved, final in zip(snapshot.kernels, kernels(model)):
        np.testing.assert_array_equal(saved, final)
    assert all(np.isfinite(w).all() for w in kernels(model))


@pytest.mark.parametrize("make, prefix", [(noise, "graft_noise"), (internal, "graft_internal")])
def test_frozen_layer_is_never_grafted(make, prefix):
    model = small_cnn()
    model.layers[0].trainable = False  # the conv with the three dead filters
    last = model.layers[6]  # trainable, the 1x1 conv: two nearly dead filters too
    weak = keras.ops.convert_to_numpy(last.kernel).copy()
    weak[..., :2] *= 1e-3
    last.kernel.assign(weak)
    model.compile(optimizer=keras.optimizers.SGD(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = keras.ops.convert_to_numpy(model.layers[0].kernel).copy()
    x, y = toy_data()
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[make()])
    assert history.history[f"{prefix}_filters"] == [0, 2]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), before)


@pytest.mark.parametrize("make, prefix", [(noise, "graft_noise"), (internal, "graft_internal")])
def test_nonfinite_kernel_is_skipped(make, prefix):
    broken = np.array(FOUR)
    broken[0, 0, 1, 3] = np.nan  # in a strong filter
    callback = make()
    callback.threshold = 0.5
    logs, [first, second] = acted(callback, conv_model(FOUR, broken), 1)
    assert logs[f"{prefix}_filters"] == 2  # the finite kernel's f0 and f2
    assert logs[f"{prefix}_skipped_nonfinite"] == 1
    assert not np.array_equal(first, FOUR)
    np.testing.assert_array_equal(second, broken)  # NaN where it was, nothing else moved


@pytest.mark.parametrize("make, kwargs, error, name", [
    (NoiseGrafting, {"threshold": -0.1}, ValueError, "threshold"),
    (NoiseGrafting, {"threshold": "0.1"}, TypeError, "threshold"),
    (NoiseGrafting, {"threshold": float("nan")}, ValueError, "threshold"),
    (NoiseGrafting, {"decay": 0.0}, ValueError, "decay"),
    (NoiseGrafting, {"decay": 1.5}, ValueError, "decay"),
    (NoiseGrafting, {"decay": None}, TypeError, "decay"),
    (NoiseGrafting, {"seed": 1.5}, TypeError, "seed"),
    (NoiseGrafting, {"seed": True}, TypeError, "seed"),
    (NoiseGrafting, {"seed": -1}, ValueError, "seed"),
    (InternalGrafting, {"threshold": -1}, ValueError, "threshold"),
    (InternalGrafting, {"threshold": [0.1]}, TypeError, "threshold"),
    (InternalGrafting, {"verbose": -1}, ValueError, "verbose"),
])
def test_bad_arguments(make, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        make(**kwargs)


def test_ends_of_the_ranges_are_allowed():
    callback = NoiseGrafting(threshold=0, decay=1, seed=0)
    assert (callback.threshold, callback.decay, callback.seed) == (0.0, 1.0, 0)
    assert InternalGrafting(threshold=0).threshold == 0.0
