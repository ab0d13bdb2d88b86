"""Tests of keras_we.experiments.data: loading, subsets, augmentation, normalization and
the seeded `CifarSequence`."""

import socket
import time
import urllib.request
import warnings

import keras
import numpy as np
import pytest

from keras_we.experiments import data
from tests.conftest import HOW_TO_PROVIDE, find_real_cifar10

# The canonical first labels of CIFAR-10.
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.fixture(scope="module")
def real(real_cifar10):
    """The real CIFAR-10 (`KERAS_WE_DATA_DIR`, else keras.datasets), or a skip."""
    return data.load_cifar()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def fail_download():
    raise Exception("URL fetch failure on https://www.cs.toronto.edu: None")


def fake_cifar(n_train=60, n_test=30, classes=10, seed=0):
    """Random uint8 images with balanced labels, Keras-style `(n, 1)`."""
    rng = np.random.default_rng(seed)
    return (
        (
            rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
            (np.arange(n_train) % classes).astype(np.uint8)[:, None],
        ),
        (
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
            (np.arange(n_test) % classes).astype(np.uint8)[:, None],
        ),
    )


def write_npz(path, arrays):
    (x_train, y_train), (x_test, y_test) = arrays
    np.savez(
        path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    return path


# Loading.


def test_load_real_data(real):
    (x_train, y_train), (x_test, y_test) = real
    assert x_train.shape == (50000, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_train.shape == (50000,) and y_test.shape == (10000,)
    assert y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert y_test[:10].tolist() == FIRST_TEST_LABELS
    assert np.bincount(y_train).tolist() == [5000] * 10


def test_load_explicit_npz_file(real, real_cifar10, tmp_path, monkeypatch):
    path = real_cifar10.path or write_npz(tmp_path / "cifar10.npz", real)
    monkeypatch.setenv(data.DATA_DIR_ENV, "/nonexistent")  # not consulted
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    (_, y_train), (x_test, _) = data.load_cifar(data_dir=path)
    np.testing.assert_array_equal(y_train, real[0][1])
    np.testing.assert_array_equal(x_test, real[1][0])


def test_load_from_directory_and_precedence(tmp_path, monkeypatch):
    fake = fake_cifar()
    write_npz(tmp_path / "cifar10.npz", fake)
    other = tmp_path / "other"
    other.mkdir()
    write_npz(other / "cifar10.npz", fake_cifar(seed=1))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(other))
    (x_train, y_train), (x_test, y_test) = data.load_cifar(data_dir=tmp_path)
    np.testing.assert_array_equal(x_train, fake[0][0])
    np.testing.assert_array_equal(y_train, fake[0][1][:, 0])
    assert y_train.shape == (60,) and y_test.shape == (30,)
    # Without the argument, the environment variable wins.
    (x_train, _), _ = data.load_cifar()
    np.testing.assert_array_equal(x_train, fake_cifar(seed=1)[0][0])


def test_load_cifar100_file(tmp_path, no_env):
    write_npz(tmp_path / "cifar100.npz", fake_cifar(200, 100, classes=100))
    (_, y_train), _ = data.load_cifar("cifar100", data_dir=tmp_path)
    assert y_train.max() == 99
    with pytest.raises(FileNotFoundError, match="No cifar10.npz in"):
        data.load_cifar("cifar10", data_dir=tmp_path)


def test_keras_download_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fake_cifar)
    # A data directory without cifar10.npz falls through to keras.datasets.
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    (x_train, y_train), _ = data.load_cifar()
    assert x_train.shape == (60, 32, 32, 3) and y_train.shape == (60,)


def test_error_when_nothing_works(tmp_path, no_env, monkeypatch):
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_cifar()
    assert isinstance(info.value, OSError)
    message = str(info.value)
    for part in (
        "`data_dir`",
        "KERAS_WE_DATA_DIR",
        "cifar10.npz",
        "keras.datasets.cifar10.load_data()",
        "URL fetch failure",
    ):
        assert part in message
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DataUnavailableError, match="holds no cifar10.npz"):
        data.load_cifar()


def test_missing_paths(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data_dir="):
        data.load_cifar(data_dir=missing)
    monkeypatch.setenv(data.DATA_DIR_ENV, missing)
    with pytest.raises(FileNotFoundError, match="KERAS_WE_DATA_DIR="):
        data.load_cifar()


def test_malformed_files(tmp_path, no_env):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks the arrays \['y_train'"):
        data.load_cifar(data_dir=path)
    (x_train, y_train), test = fake_cifar()
    write_npz(path, ((x_train, y_train + 10), test))
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        data.load_cifar(data_dir=path)
    write_npz(path, ((x_train.astype(np.float32), y_train), test))
    with pytest.raises(ValueError, match="uint8"):
        data.load_cifar(data_dir=path)
    np.save(tmp_path / "x.npy", x_train)
    with pytest.raises(ValueError, match="is not a .npz file"):
        data.load_cifar(data_dir=tmp_path / "x.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="Cannot read"):
        data.load_cifar(data_dir=tmp_path / "text.npz")


def test_unknown_dataset():
    with pytest.raises(
        ValueError, match=r"name='mnist'.*'cifar10', 'cifar100'"
    ):
        data.load_cifar("mnist")


# Finding the real data for the tests (tests/conftest.py).


def test_real_cifar10_skips_with_a_reason_when_nothing_works(tmp_path, monkeypatch):
    # No KERAS_WE_DATA_DIR and no download: a skip saying how to provide
    # the data; no other folder (such as ../shared/data) is consulted.
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    source = find_real_cifar10()
    assert source.path is None
    assert HOW_TO_PROVIDE in source.skip_reason
    assert "set KERAS_WE_DATA_DIR to a folder holding cifar10.npz, or allow " \
        "keras.datasets to download it" in source.skip_reason
    assert "URL fetch failure" in source.skip_reason
    # A KERAS_WE_DATA_DIR that does not exist is a skip too, naming it.
    missing = str(tmp_path / "missing")
    monkeypatch.setenv(data.DATA_DIR_ENV, missing)
    source = find_real_cifar10()
    assert HOW_TO_PROVIDE in source.skip_reason and missing in source.skip_reason


def test_real_cifar10_found_through_the_env_var(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "cifar10.npz", fake_cifar())
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail_download)
    assert find_real_cifar10() == (str(path), None)
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fake_cifar)
    assert find_real_cifar10() == (None, None)  # from keras.datasets


def test_real_cifar10_download_cannot_hang(tmp_path, monkeypatch):
    # A server that accepts the connection and never answers: keras's
    # download (`urllib.request.urlretrieve`, no timeout of its own) would
    # wait forever; the fixture's socket timeout turns it into a skip.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-python.tar.gz"

    def stalled_download():
        urllib.request.urlretrieve(url, tmp_path / "cifar.tar.gz")

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", stalled_download)
    default = socket.getdefaulttimeout()
    start = time.monotonic()
    try:
        source = find_real_cifar10(timeout=0.5)
    finally:
        server.close()
    assert time.monotonic() - start < 10
    assert HOW_TO_PROVIDE in source.skip_reason and "timed out" in source.skip_reason
    assert socket.getdefaulttimeout() == default


# Subsets.


def test_stratified_subsets(real):
    (x_train, y_train), (x_test, y_test) = data.load_cifar(
        train_size=1000, test_size=105, seed=3
    )
    assert np.bincount(y_train).tolist() == [100] * 10
    counts = np.bincount(y_test, minlength=10)
    assert sorted(counts.tolist()) == [10] * 5 + [11] * 5
    # The subset is made of real examples, in their original order.
    keep = data.stratified_indices(real[0][1], 1000, seed=(3, 1))
    np.testing.assert_array_equal(x_train, real[0][0][keep])
    assert np.all(np.diff(keep) > 0)
    # Deterministic given the seed, different for another seed.
    (x_again, _), (x_test_again, _) = data.load_cifar(
        train_size=1000, test_size=105, seed=3
    )
    np.testing.assert_array_equal(x_again, x_train)
    np.testing.assert_array_equal(x_test_again, x_test)
    (x_other, _), _ = data.load_cifar(train_size=1000, seed=4)
    assert not np.array_equal(x_other, x_train)


def test_stratified_indices_unbalanced():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10)
    keep = data.stratified_indices(labels, 12, seed=0)
    assert np.bincount(labels[keep]).tolist() == [2, 5, 5]
    assert len(set(keep.tolist())) == 12
    keep = data.stratified_indices(labels, 22, seed=0)
    np.testing.assert_array_equal(keep, np.arange(22))


@pytest.mark.parametrize("size", [0, -1, 61, 1.5, True, "10"])
def test_bad_sizes(size, tmp_path, no_env):
    path = write_npz(tmp_path / "cifar10.npz", fake_cifar())
    with pytest.raises(
        ValueError,
        match=r"`train_size` must be None or an integer between 1 and 60",
    ):
        data.load_cifar(data_dir=path, train_size=size)
    with pytest.raises(
        ValueError,
        match=r"`test_size` must be None or an integer between 1 and 30",
    ):
        data.load_cifar(data_dir=path, test_size=size)


@pytest.mark.parametrize("seed", [-1, 1.0, None, "0"])
def test_bad_seed(seed):
    with pytest.raises(
        ValueError, match="`seed` must be a non-negative integer"
    ):
        data.load_cifar(seed=seed)


# Normalization and augmentation.


def test_normalize_numbers(real):
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2023, 0.1994, 0.2010])
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [128, 64, 1]]], np.uint8)
    expected = (pixels / 255.0 - mean) / std
    out = data.normalize(pixels)
    assert out.dtype == np.float32 and out.shape == (1, 3, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-6)
    # The paper's mean is the training-set mean: normalized mean ~ 0.
    x_train = real[0][0]
    means = [
        data.normalize(x_train[i : i + 10000]).mean(axis=(0, 1, 2))
        for i in range(0, 50000, 10000)
    ]
    np.testing.assert_allclose(np.mean(means, axis=0), 0.0, atol=1e-3)
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), np.uint8)
    np.testing.assert_array_equal(
        data.normalize(images),
        ((images / 255.0 - mean) / std).astype(np.float32),
    )
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(images.astype(np.float32))
    with pytest.raises(ValueError, match="one value per channel"):
        data.normalize(images, mean=(0.5,), std=(0.5,))


def find_crop(source, crop, padding=4):
    """The `(row, col, flipped)` placements of `crop` in the zero-padded
    `source`."""
    padded = np.pad(source, ((padding, padding), (padding, padding), (0, 0)))
    h, w, _ = source.shape
    return [
        (r, c, flipped)
        for r in range(2 * padding + 1)
        for c in range(2 * padding + 1)
        for flipped in (False, True)
        if np.array_equal(
            padded[r : r + h, c : c + w][:, :: -1 if flipped else 1], crop
        )
    ]


def test_augment_crops_and_flips(real):
    x = real[0][0][:64]
    out = data.augment(x, np.random.default_rng(7))
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert out.flags.c_contiguous
    # The documented draws: offsets into the padded image, then flips.
    rng = np.random.default_rng(7)
    offsets = rng.integers(0, 9, size=(64, 2))
    flips = rng.random(64) < 0.5
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i, ((r, c), flip) in enumerate(zip(offsets, flips)):
        window = padded[i, r : r + 32, c : c + 32]
        np.testing.assert_array_equal(
            out[i], window[:, ::-1] if flip else window
        )
    # Independently of the draw order: each output is a shifted window of
    # its zero-padded source, flipped or not.
    for i in range(8):
        assert (offsets[i][0], offsets[i][1], flips[i]) in find_crop(
            x[i], out[i]
        )
    assert 0 < flips.sum() < 64
    assert set(offsets.ravel().tolist()) == set(range(9))


def test_augment_determinism():
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8)
    np.testing.assert_array_equal(data.augment(x, 3), data.augment(x, 3))
    assert not np.array_equal(data.augment(x, 3), data.augment(x, 4))
    rng = np.random.default_rng(3)
    first, second = data.augment(x, rng), data.augment(x, rng)
    assert not np.array_equal(first, second)
    # Without padding only flips remain.
    out = data.augment(x, 5, padding=0)
    for image, source in zip(out, x):
        assert np.array_equal(image, source) or np.array_equal(
            image, source[:, ::-1]
        )
    with pytest.raises(ValueError, match="uint8"):
        data.augment(x.astype(np.float32), 0)
    with pytest.raises(ValueError, match="padding=-1"):
        data.augment(x, 0, padding=-1)


# CifarSequence.


@pytest.fixture(scope="module")
def small(real):
    (x_train, y_train), _ = real
    return x_train[:300], y_train[:300]


def epoch_batches(sequence, indices=None):
    indices = range(len(sequence)) if indices is None else indices
    return {i: sequence[i] for i in indices}


def assert_same_batches(a, b):
    assert a.keys() == b.keys()
    for i in a:
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])


def test_sequence_plain_batches(small):
    x, y = small
    sequence = data.CifarSequence(x, y, batch_size=128)
    assert len(sequence) == 3
    images, labels = sequence[2]
    assert images.shape == (44, 32, 32, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images, data.normalize(x[256:]))
    np.testing.assert_array_equal(labels, y[256:])
    with pytest.raises(IndexError):
        sequence[3]


def test_sequence_shuffle_and_augment(small):
    x, y = small
    sequence = data.CifarSequence(
        x, y, batch_size=64, augment=True, shuffle=True, seed=5
    )
    order = sequence.order()
    assert sorted(order.tolist()) == list(range(300))
    images, labels = sequence[1]
    rows = order[64:128]
    np.testing.assert_array_equal(labels, y[rows])
    # Every image is an augmentation of its source image.
    pixels = np.rint(
        (images * np.array(data.CIFAR_STD) + np.array(data.CIFAR_MEAN)) * 255
    ).astype(np.uint8)
    for i in range(4):
        assert find_crop(x[rows[i]], pixels[i])


def test_sequence_without_normalization_serves_the_same_uint8_pixels(small):
    """`normalize=False` (for a model that normalizes, such as one behind
    `DeviceAugmentation`): the same order, crops and flips, as uint8."""
    x, y = small
    for augment in (False, True):
        kwargs = dict(batch_size=64, augment=augment, shuffle=True, seed=5)
        raw = data.CifarSequence(x, y, normalize=False, **kwargs)
        normalized = data.CifarSequence(x, y, **kwargs)
        raw.epoch = normalized.epoch = 2
        for index in (0, 4):  # batch 4 is the last, of 44 images
            pixels, labels = raw[index]
            images, expected_labels = normalized[index]
            assert pixels.dtype == np.uint8 and pixels.shape == images.shape
            np.testing.assert_array_equal(labels, expected_labels)
            np.testing.assert_array_equal(data.normalize(pixels), images)
        if not augment:
            np.testing.assert_array_equal(raw[1][0], x[raw.order(2)[64:128]])


def test_sequence_determinism(small):
    """A batch depends only on (seed, epoch, index): not on the instance,
    the order batches are asked in, or the epochs visited before."""
    x, y = small

    def make(seed):
        return data.CifarSequence(
            x, y, batch_size=64, augment=True, shuffle=True, seed=seed
        )

    a, b, other = make(1), make(1), make(2)
    assert a.epoch == 0
    first = epoch_batches(a)
    # Same seed, another instance, batches asked for in another order.
    assert_same_batches(first, epoch_batches(b, reversed(range(len(b)))))
    assert not np.array_equal(other[0][0], first[0][0])
    assert not np.array_equal(other.order(), a.order())
    # A new epoch brings a new order and new crops, the same for a and b.
    a.epoch = 1
    second = epoch_batches(a)
    assert not np.array_equal(second[0][0], first[0][0])
    assert not np.array_equal(a.order(), a.order(0))
    # b jumps there from elsewhere (as a resumed run does, or worker
    # threads asking for another epoch in between).
    b.epoch = 5
    epoch_batches(b)
    b.epoch = 1
    assert_same_batches(second, epoch_batches(b))
    resumed = make(1)
    resumed.epoch = 1
    assert_same_batches(second, epoch_batches(resumed))
    resumed.epoch = 0
    assert_same_batches(first, epoch_batches(resumed))


def test_crops_and_flips_are_drawn_anew_every_epoch(small):
    """With shuffling off each batch holds the same images every epoch, so
    only the crops and flips can change: every image must get new ones
    from epoch to epoch (a draw that ignored the epoch would give each
    image one crop for the whole run)."""
    x, y = small
    sequence = data.CifarSequence(x, y, batch_size=64, augment=True, shuffle=False, seed=5)
    data.SyncEpoch(sequence)
    epochs = 6
    crops = []
    for epoch in range(epochs):
        sequence.epoch = epoch
        images, labels = sequence[1]
        np.testing.assert_array_equal(labels, y[64:128])
        crops.append(np.rint(
            (images * np.array(data.CIFAR_STD) + np.array(data.CIFAR_MEAN)) * 255).astype(np.uint8))
    for i in range(16):
        source = x[64 + i]
        placements = [find_crop(source, crop[i]) for crop in crops]
        assert all(placements), f"image {i}: not a crop of its own source"
        distinct = {crop[i].tobytes() for crop in crops}
        # 81 offsets x 2 flips: six draws rarely repeat one.
        assert len(distinct) >= epochs - 1, (i, placements)
    # Coming back to an epoch gives its crops again.
    sequence.epoch = 2
    again = np.rint((sequence[1][0] * np.array(data.CIFAR_STD) + np.array(data.CIFAR_MEAN)) * 255)
    np.testing.assert_array_equal(again.astype(np.uint8), crops[2])


def test_the_sequence_never_moves_its_epoch_itself(small):
    x, y = small
    sequence = data.CifarSequence(x, y, batch_size=128, seed=3)
    data.SyncEpoch(sequence)  # no warning below
    # What fit() calls on a PyDataset, over and over: the epoch stays.
    for _ in range(3):
        sequence.on_epoch_begin()
        epoch_batches(sequence)
        sequence.on_epoch_end()
    assert sequence.epoch == 0
    sequence.epoch = 7
    sequence.on_epoch_end()
    assert sequence.epoch == 7
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="`epoch` must be an integer >= 0"):
            sequence.epoch = bad
    assert sequence.epoch == 7
    sequence.epoch = np.int64(2)
    assert sequence.epoch == 2 and type(sequence.epoch) is int


def test_initial_epoch_is_gone_and_says_what_replaces_it(small):
    x, y = small
    with pytest.raises(TypeError, match=r"SyncEpoch\(sequence\)"):
        data.CifarSequence(x, y, initial_epoch=1)


class RecordingSequence(data.CifarSequence):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __getitem__(self, index):
        self.calls.append((self.epoch, index))
        return super().__getitem__(index)


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def max_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.parametrize("through", ["sequence", "fit_input"])
def test_fit_trains_epoch_e_on_the_batches_of_epoch_e(small, through):
    """The one thing the exactness takes from Keras, checked on the current
    backend: with `workers=1`, `fit()` asks for the batches of epoch `e`
    only after the callbacks' `on_epoch_begin(e)`, where `SyncEpoch` moves
    the sequence to `e`; also when `fit()` resumes at `initial_epoch`, after
    a pass that builds the model on a batch of the sequence's epoch 0.
    Public API only; a Keras that prefetched across epochs fails this. The
    same through `fit_input` (on TensorFlow, a prefetched tf.data pipeline).
    """
    wrap = data.fit_input if through == "fit_input" else (lambda sequence: sequence)
    x, y = small
    epochs = 3

    def sequence():
        return data.CifarSequence(
            x[:96], y[:96], batch_size=32, augment=True, shuffle=True, seed=1
        )

    def by_hand(epoch_list):
        model, train = tiny_model(), sequence()
        for epoch in epoch_list:
            train.epoch = epoch
            for index in range(len(train)):
                model.train_on_batch(*train[index])
        return model.get_weights()

    want = by_hand(range(epochs))
    # Data of other epochs would show: a different trajectory.
    assert max_difference(want, by_hand([0] * epochs)) > 1e-3

    model, train = tiny_model(), sequence()
    model.fit(
        wrap(train), epochs=epochs, shuffle=False, verbose=0,
        callbacks=[data.SyncEpoch(train)],
    )
    assert max_difference(model.get_weights(), want) <= 1e-6

    # Interrupted after epoch 0, resumed in a new fit() on a new sequence.
    model, train = tiny_model(), sequence()
    model.fit(wrap(train), epochs=1, shuffle=False, verbose=0, callbacks=[data.SyncEpoch(train)])
    resumed = sequence()
    model.fit(
        wrap(resumed), initial_epoch=1, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[data.SyncEpoch(resumed)],
    )
    assert max_difference(model.get_weights(), want) <= 1e-6


def test_sequence_with_fit(small):
    x, y = small

    def train(seed):
        keras.utils.set_random_seed(0)
        sequence = RecordingSequence(
            x[:96],
            y[:96],
            batch_size=32,
            augment=True,
            shuffle=True,
            seed=seed,
        )
        model = tiny_model()
        model.fit(
            sequence,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[data.SyncEpoch(sequence)],
        )
        return sequence, model.get_weights()

    sequence, weights = train(seed=1)
    assert sequence.epoch == 1
    epochs = [epoch for epoch, _ in sequence.calls]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}
    assert sorted(i for e, i in sequence.calls if e == 1) == [0, 1, 2]
    assert {i for e, i in sequence.calls if e == 0} == {0, 1, 2}
    # Paired runs: the same seed trains identically, another seed does not.
    _, again = train(seed=1)
    for a, b in zip(weights, again):
        np.testing.assert_array_equal(a, b)
    _, other = train(seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(weights, other))


def test_without_sync_epoch_every_epoch_is_the_same_and_fit_warns(small):
    x, y = small
    sequence = RecordingSequence(x[:96], y[:96], batch_size=32, augment=True, seed=1)
    with pytest.warns(UserWarning, match="without SyncEpoch") as warned:
        tiny_model().fit(sequence, epochs=3, shuffle=False, verbose=0)
    assert len([w for w in warned if "SyncEpoch" in str(w.message)]) == 1
    assert {e for e, _ in sequence.calls} == {0} and sequence.epoch == 0
    # Nothing to warn about: a sequence that neither shuffles nor augments
    # (a test set), or one with a SyncEpoch.
    plain = data.CifarSequence(x[:96], y[:96], batch_size=32)
    synced = data.CifarSequence(x[:96], y[:96], batch_size=32, augment=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without SyncEpoch")
        tiny_model().evaluate(plain, verbose=0)
        tiny_model().fit(synced, epochs=1, verbose=0, shuffle=False, callbacks=[data.SyncEpoch(synced)])
    with pytest.raises(TypeError, match="`epoch` attribute"):
        data.SyncEpoch(object())


def test_sync_epoch_when_resuming(small):
    x, y = small
    sequence = RecordingSequence(x[:96], y[:96], batch_size=32, seed=1)
    model = tiny_model()
    model.fit(
        sequence,
        initial_epoch=1,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[data.SyncEpoch(sequence)],
    )
    assert sorted(i for e, i in sequence.calls if e == 1) == [0, 1, 2]
    assert {e for e, _ in sequence.calls} <= {0, 1}  # 0: building the model
    assert sequence.epoch == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1"),
        ({"seed": -1}, "`seed` must be an integer >= 0"),
        ({"mean": (0.5, 0.5)}, "one value per channel"),
    ],
)
def test_sequence_bad_arguments(small, kwargs, match):
    x, y = small
    with pytest.raises(ValueError, match=match):
        data.CifarSequence(x, y, **kwargs)


def test_sequence_bad_arrays(small):
    x, y = small
    with pytest.raises(ValueError, match="`x` must be a uint8 array"):
        data.CifarSequence(x.astype(np.float32), y)
    with pytest.raises(ValueError, match="same length"):
        data.CifarSequence(x, y[:-1])


def test_make_datasets(tmp_path, no_env):
    write_npz(tmp_path / "cifar10.npz", fake_cifar(100, 40))
    train, test = data.make_datasets(
        data_dir=tmp_path, batch_size=16, train_size=50, seed=2
    )
    assert (len(train.x), len(test.x)) == (50, 40)
    assert train.augment and train.shuffle and train.seed == 2
    assert not test.augment and not test.shuffle
    assert len(train) == 4 and len(test) == 1


def test_sequence_undoes_tensorflow_malloc_patch_at_each_epochs_first_batch(small, monkeypatch):
    """On TensorFlow, `fit` reads a PyDataset through a generator dataset
    that sets glibc's malloc thresholds (2x slower training); the sequence
    sets them back as it serves batch 0, on TensorFlow only."""
    calls = []
    monkeypatch.setattr(data, "undo_tf_malloc_patch", lambda: calls.append(1))
    x, y = small
    sequence = data.CifarSequence(x, y, batch_size=128)
    sequence[0], sequence[1], sequence[2], sequence[0]
    assert len(calls) == (2 if keras.backend.backend() == "tensorflow" else 0)
    monkeypatch.undo()
    data.undo_tf_malloc_patch()  # the real one: harmless here, glibc or not


def test_fit_input_serves_the_sequence_batches_with_autotuning_off(small):
    """On TensorFlow, `fit_input` is a tf.data pipeline of the sequence's
    batches in order, of the epoch the sequence is at when it is read, with
    autotuning off (its thread made `fit` pause 9-10 s at the start of
    every other epoch); elsewhere it is the sequence itself."""
    x, y = small
    sequence = data.CifarSequence(x[:300], y[:300], batch_size=128, augment=True, shuffle=True, seed=3)
    served = data.fit_input(sequence, prefetch=1)
    if keras.backend.backend() != "tensorflow":
        assert served is sequence
        return
    import tensorflow as tf

    assert isinstance(served, tf.data.Dataset)
    assert served.options().autotune.enabled is False
    assert int(served.cardinality()) == len(sequence) == 3
    for epoch in (0, 4):
        sequence.epoch = epoch
        batches = list(served.as_numpy_iterator())
        assert [len(labels) for _, labels in batches] == [128, 128, 44]
        for index, (images, labels) in enumerate(batches):
            want_images, want_labels = sequence[index]
            assert images.dtype == np.float32 and labels.dtype == np.int32
            np.testing.assert_array_equal(images, want_images)
            np.testing.assert_array_equal(labels, want_labels)
    assert not np.array_equal(batches[0][0], data.CifarSequence(
        x[:300], y[:300], batch_size=128, augment=True, shuffle=True, seed=3)[0][0])
    raw = data.fit_input(data.CifarSequence(x[:300], y[:300], normalize=False))
    assert raw.element_spec[0].dtype == tf.uint8


@pytest.mark.parametrize("prefetch", [0, -1, 1.5, True, "2"])
def test_fit_input_bad_prefetch(small, prefetch):
    x, y = small
    with pytest.raises(ValueError, match=r"`prefetch` must be an integer >= 1"):
        data.fit_input(data.CifarSequence(x[:10], y[:10]), prefetch=prefetch)
