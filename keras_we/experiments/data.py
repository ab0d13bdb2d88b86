"""CIFAR data: loading, subsets, the paper's augmentation and a seeded input
pipeline for `model.fit()`.

The training recipe of the Weight Evolution paper (and of most CIFAR
papers) is, per image: pad 4 pixels of zeros on every side, take a random
32x32 crop, flip horizontally with probability 1/2, scale the pixels to
[0, 1] and normalize each channel with `CIFAR_MEAN` and `CIFAR_STD`. Test
images are only normalized. `augment()` and `normalize()` do this on whole
uint8 batches in NumPy, and `CifarSequence` feeds the result to
`model.fit()` on any backend. `DeviceAugmentation` does the same with
`keras.ops` inside the model's training step, on uint8 batches that a
`CifarSequence(normalize=False)` serves.

Every random choice (subset, epoch order, crops, flips) comes from a NumPy
generator seeded by the `seed` argument and, in `CifarSequence`, by the
epoch and batch index, so two runs with the same seed see exactly the same
batches. This is what makes paired comparisons of training methods fair.
"""

import ctypes
import functools
import math
import os
import sys
import warnings

import keras
import numpy as np

DATASETS = {"cifar10": 10, "cifar100": 100}
DATA_DIR_ENV = "KERAS_WE_DATA_DIR"

# Per-channel statistics of the CIFAR-10 training images on [0, 1], as
# used by the paper's code (`transforms.Normalize`).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")

# Random streams are seeded with `[seed, stream, ...]`, with a distinct
# `stream` per use: 1 and 2 for the train and test subsets, 3 for the
# epoch orders, 4 for the augmentation. (NumPy's SeedSequence gives `[a, b]`
# and `[a, b, 0]` the same stream, so the tag must not come last.)


class DataUnavailableError(OSError):
    """Raised by `load_cifar()` when no source of the data works."""


def load_cifar(
    name="cifar10",
    data_dir=None,
    train_size=None,
    test_size=None,
    seed=0,
):
    """Loads CIFAR-10 or CIFAR-100, optionally a stratified subset of it.

    The data comes from the first of these that is set:

    1. `data_dir`: a `.npz` file, or a directory holding `{name}.npz`
       (`cifar10.npz` or `cifar100.npz`).
    2. The environment variable `KERAS_WE_DATA_DIR`, read the same way.
       If it names a directory without `{name}.npz`, loading goes on
       with 3.
    3. `keras.datasets.cifar10.load_data()` or
       `keras.datasets.cifar100.load_data()` (label mode `"fine"`),
       which download the data once into `~/.keras/datasets`.

    A `.npz` file must hold the arrays `x_train` (`(N, 32, 32, 3)` uint8),
    `y_train` (`(N,)` or `(N, 1)` integers), `x_test` and `y_test`.
    To write one from the Keras copy:

    ```python
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    np.savez("cifar10.npz", x_train=x_train, y_train=y_train,
             x_test=x_test, y_test=y_test)
    ```

    Args:
        name: `"cifar10"` or `"cifar100"`. Defaults to `"cifar10"`.
        data_dir: Path of a `.npz` file or of a directory holding
            `{name}.npz`, or `None` to use `KERAS_WE_DATA_DIR` or
            `keras.datasets`. Defaults to `None`.
        train_size: Number of training images to keep, or `None` for
            all. The subset is stratified: every class gets the same
            number of images, give or take one. Defaults to `None`.
        test_size: Same for the test images. Defaults to `None`.
        seed: Non-negative integer seeding the choice of the subsets.
            Defaults to `0`.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: images as uint8 arrays of
        shape `(N, 32, 32, 3)`, labels as flat uint8 arrays of shape
        `(N,)`. Subsets keep the original order of the images.

    Raises:
        ValueError: for an unknown `name`, invalid sizes or seed, or a
            malformed `.npz` file.
        FileNotFoundError: if `data_dir` or `KERAS_WE_DATA_DIR` names a
            path that does not exist, or `data_dir` is a directory
            without `{name}.npz`.
        DataUnavailableError: (an `OSError`) if no file is configured and
            `keras.datasets` cannot download the data.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset: name={name!r}. "
            f"Expected one of {sorted(DATASETS)}."
        )
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or seed < 0
    ):
        raise ValueError(
            f"`seed` must be a non-negative integer. Received: seed={seed!r}"
        )

    (x_train, y_train), (x_test, y_test) = _load_arrays(name, data_dir)

    _check_size("train_size", train_size, len(x_train), name, "training")
    _check_size("test_size", test_size, len(x_test), name, "test")
    if train_size is not None:
        keep = stratified_indices(y_train, train_size, seed=(seed, 1))
        x_train, y_train = x_train[keep], y_train[keep]
    if test_size is not None:
        keep = stratified_indices(y_test, test_size, seed=(seed, 2))
        x_test, y_test = x_test[keep], y_test[keep]
    return (x_train, y_train), (x_test, y_test)


def _load_arrays(name, data_dir):
    filename = f"{name}.npz"
    if data_dir is not None:
        path = os.fspath(data_dir)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"`data_dir` does not exist: data_dir={path!r}. Expected a "
                f".npz file or a directory holding {filename}."
            )
        if os.path.isdir(path):
            path = os.path.join(path, filename)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"No {filename} in data_dir={os.fspath(data_dir)!r}."
                )
        return _load_npz(path, name)

    tried = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        if not os.path.exists(env_dir):
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={env_dir!r} does not exist. Expected a "
                f".npz file or a directory holding {filename}."
            )
        path = env_dir
        if os.path.isdir(env_dir):
            path = os.path.join(env_dir, filename)
        if os.path.exists(path):
            return _load_npz(path, name)
        tried.append(f"{DATA_DIR_ENV}={env_dir!r} holds no {filename}")

    dataset = getattr(keras.datasets, name)
    try:
        (x_train, y_train), (x_test, y_test) = dataset.load_data()
    except Exception as e:
        tried.append(
            f"keras.datasets.{name}.load_data() failed "
            f"({type(e).__name__}: {e})"
        )
        raise DataUnavailableError(
            f"Could not load {name}: {'; '.join(tried)}. Either pass "
            f"`data_dir` (a .npz file, or a directory holding {filename}, "
            f"with the arrays {', '.join(_ARRAY_KEYS)}) or set the "
            f"environment variable {DATA_DIR_ENV} to such a path, or let "
            f"keras.datasets.{name}.load_data() download the data (this "
            "needs internet access once; it caches the data in "
            "~/.keras/datasets)."
        ) from e
    return _check_arrays(
        name,
        f"keras.datasets.{name}",
        (x_train, y_train, x_test, y_test),
    )


def _load_npz(path, name):
    try:
        npz = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read {path} as a .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} is not a .npz file of the arrays {list(_ARRAY_KEYS)}."
        )
    with npz:
        missing = [key for key in _ARRAY_KEYS if key not in npz.files]
        if missing:
            raise ValueError(
                f"{path} lacks the arrays {missing}. Expected the arrays "
                f"{list(_ARRAY_KEYS)}; found {sorted(npz.files)}."
            )
        arrays = tuple(npz[key] for key in _ARRAY_KEYS)
    return _check_arrays(name, path, arrays)


def _check_arrays(name, source, arrays):
    x_train, y_train, x_test, y_test = arrays
    classes = DATASETS[name]
    pairs = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        y = np.asarray(y).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(
                f"x_{split} from {source} must be a uint8 array of shape "
                f"(N, height, width, channels). "
                f"Received: dtype={x.dtype}, shape={x.shape}"
            )
        if len(y) != len(x):
            raise ValueError(
                f"x_{split} and y_{split} from {source} differ in length: "
                f"{len(x)} != {len(y)}"
            )
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise ValueError(
                f"y_{split} from {source} must hold {name} labels in "
                f"[0, {classes}). Received labels in "
                f"[{y.min()}, {y.max()}]"
            )
        pairs.append((x, y.astype(np.uint8)))
    return tuple(pairs)


def _check_size(arg, size, available, name, split):
    if size is None:
        return
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or not 1 <= size <= available
    ):
        raise ValueError(
            f"`{arg}` must be None or an integer between 1 and {available} "
            f"(the size of the {name} {split} set). "
            f"Received: {arg}={size!r}"
        )


def stratified_indices(labels, size, seed=0):
    """Picks `size` indices with every class as equally represented as
    possible.

    Each class gets `size // num_classes` indices, and `size % num_classes`
    classes chosen at random get one more; a class with too few examples
    gives all it has and the others share the rest. Within each class the
    indices are drawn at random without replacement.

    Args:
        labels: 1D array of integer labels.
        size: Number of indices to pick, between 1 and `len(labels)`.
        seed: Seed of the NumPy generator (an integer or a sequence of
            integers). Defaults to `0`.

    Returns:
        Sorted int64 array of `size` distinct indices into `labels`.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 1 <= size <= len(labels):
        raise ValueError(
            f"`size` must be between 1 and {len(labels)}. Received: size={size}"
        )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros_like(counts)
    remaining = size
    while remaining:
        open_classes = np.flatnonzero(quota < counts)
        share = remaining // len(open_classes)
        if share == 0:
            lucky = rng.permutation(open_classes)[:remaining]
            quota[lucky] += 1
            break
        grant = np.minimum(share, counts[open_classes] - quota[open_classes])
        quota[open_classes] += grant
        remaining -= int(grant.sum())
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota)
    ]
    return np.sort(np.concatenate(picked))


def normalize(images, mean=CIFAR_MEAN, std=CIFAR_STD):
    """Scales uint8 images to [0, 1] and normalizes each channel.

    Computes `(images / 255 - mean) / std` per channel, as
    `torchvision.transforms.ToTensor()` followed by `Normalize(mean, std)`.
    The result for each of the 256 pixel values is computed in float64,
    rounded to float32 and looked up, which is exact and faster than
    float arithmetic on the batch.

    Args:
        images: uint8 array of shape `(..., channels)`.
        mean: Per-channel means on [0, 1]. Defaults to `CIFAR_MEAN`.
        std: Per-channel standard deviations on [0, 1].
            Defaults to `CIFAR_STD`.

    Returns:
        float32 array of the same shape as `images`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 1:
        raise ValueError(
            "`images` must be a uint8 array of shape (..., channels). "
            f"Received: dtype={images.dtype}, shape={images.shape}"
        )
    table = _normalization_table(mean, std, images.shape[-1])
    outputs = np.empty(images.shape, dtype=np.float32)
    _normalize_into(images, table, outputs)
    return outputs


def _normalization_table(mean, std, channels):
    """`(channels, 256)` float32 table of the normalized pixel values."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    if not len(mean) == len(std) == channels:
        raise ValueError(
            "`mean` and `std` need one value per channel. Received: "
            f"{len(mean)} means and {len(std)} stds for {channels} channels"
        )
    if np.any(std <= 0):
        raise ValueError(f"`std` must be positive. Received: std={std}")
    table = (np.arange(256) / 255.0 - mean[:, None]) / std[:, None]
    return table.astype(np.float32)


def _normalize_into(images, table, outputs):
    for channel, values in enumerate(table):
        np.take(
            values, images[..., channel], out=outputs[..., channel], mode="clip"
        )


def augment(images, rng, padding=4):
    """Random crops with zero padding and random horizontal flips.

    Each image is padded with `padding` zero pixels on every side, cropped
    back to its size at a uniformly random offset, and flipped left-right
    with probability 1/2, as `transforms.RandomCrop(32, padding=4)`
    followed by `transforms.RandomHorizontalFlip()`. The batch is padded
    once and all crops are gathered at once. The random draws are, in this
    order, `rng.integers(0, 2 * padding + 1, size=(n, 2))` (row and column
    offsets into the padded image) and `rng.random(n) < 0.5` (flips).

    Args:
        images: uint8 array of shape `(n, height, width, channels)`.
        rng: A `numpy.random.Generator`, or a seed for one.
        padding: Non-negative integer, pixels of padding on each side.
            Defaults to `4`.

    Returns:
        uint8 array of the same shape as `images`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            "`images` must be a uint8 array of shape "
            "(n, height, width, channels). "
            f"Received: dtype={images.dtype}, shape={images.shape}"
        )
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(
            "`padding` must be a non-negative integer. "
            f"Received: padding={padding!r}"
        )
    offsets, flips = _draw_crops(
        np.random.default_rng(rng), len(images), padding
    )
    return np.ascontiguousarray(_crop(images, offsets, flips, padding))


def _draw_crops(rng, n, padding):
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    return offsets, flips


def _crop(images, offsets, flips, padding):
    """The crops of `augment()`, as a (non-contiguous) array."""
    n, height, width, _ = images.shape
    padded = np.pad(
        images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
    )
    # Views of every crop: (n, rows, cols, channels, height, width).
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, (height, width), axis=(1, 2)
    )
    crops = windows[np.arange(n), offsets[:, 0], offsets[:, 1]]
    crops = np.moveaxis(crops, 1, -1)
    crops[flips] = crops[flips, :, ::-1]
    return crops


# ------------------------------------------------- augmentation on the device


def device_crop(images, offsets, flips, padding=4):
    """`_crop()` with `keras.ops`, on a backend tensor: the crops of the
    zero-padded `images` at `offsets` (`(n, 2)` integers, row and column
    into the padded image), flipped left-right where `flips` (`(n,)`
    booleans). Pure gathers, so the pixels equal NumPy's exactly.

    Args:
        images: uint8 tensor, `(n, height, width, channels)`.
        offsets: integer tensor, `(n, 2)`, each in `[0, 2 * padding]`.
        flips: boolean tensor, `(n,)`.
        padding: Non-negative integer. Defaults to `4`.

    Returns:
        uint8 tensor of the shape of `images`.
    """
    from keras import ops

    height, width, channels = images.shape[1:]
    n = ops.shape(images)[0]
    padded = ops.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = ops.cast(offsets, "int32")
    rows = offsets[:, :1] + ops.arange(height, dtype="int32")[None]
    columns = ops.arange(width, dtype="int32")[None]
    columns = offsets[:, 1:] + ops.where(flips[:, None], width - 1 - columns, columns)
    rows = ops.broadcast_to(rows[:, :, None, None], (n, height, width + 2 * padding, channels))
    crops = ops.take_along_axis(padded, rows, axis=1)
    columns = ops.broadcast_to(columns[:, None, :, None], (n, height, width, channels))
    return ops.take_along_axis(crops, columns, axis=2)


def device_normalize(images, table):
    """`normalize()` with `keras.ops`: uint8 `images` `(..., channels)`
    looked up in `table` (`_normalization_table`, `(channels, 256)`
    float32), so the values equal NumPy's exactly. Returns float32."""
    from keras import ops

    channels = table.shape[0]
    index = ops.cast(images, "int32") + 256 * ops.arange(channels, dtype="int32")
    return ops.take(ops.convert_to_tensor(table.reshape(-1)), index)


@keras.saving.register_keras_serializable(package="keras_we")
class DeviceAugmentation(keras.layers.Layer):
    """The paper's augmentation and normalization inside the training step.

    Takes uint8 images `(n, height, width, channels)`. In training, each
    image is padded with `padding` zero pixels, cropped back at a random
    offset and flipped left-right with probability 1/2, as `augment()`
    (`device_crop`); in training and inference, it is then normalized as
    `normalize()`, to the same float32 values (`device_normalize`).

    The draws come from the layer's own `keras.random.SeedGenerator(seed)`,
    one training batch after the other: `randint((n, 2), 0, 2 * padding +
    1)` (the offsets), then `uniform((n,)) < 0.5` (the flips). Nothing else
    draws from it, so two models whose layer has the same seed, trained
    for the same steps on the same uint8 batches, see the same crops and
    flips, whatever a callback does between epochs (Weight Evolution draws
    nothing). The generator's state is saved with the layer's weights
    (`save_weights`, so `keras.callbacks.BackupAndRestore` too), so a
    resumed `fit` goes on with the draws of an uninterrupted one.

    The draws are not `CifarSequence`'s NumPy ones: runs augmented on the
    device pair with each other, not with runs augmented on the host.

    Args:
        seed: Non-negative integer seeding the draws. Defaults to `0`.
        padding: Non-negative integer. Defaults to `4`.
        mean: Per-channel means. Defaults to `CIFAR_MEAN`.
        std: Per-channel standard deviations. Defaults to `CIFAR_STD`.
        **kwargs: `keras.layers.Layer` arguments (`name`); the layer
            computes in float32 whatever the dtype policy.

    Example:

    ```python
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    model = keras.Model(inputs, network(DeviceAugmentation(seed=0)(inputs)))
    train = CifarSequence(x, y, shuffle=True, seed=0, normalize=False)
    model.fit(train, shuffle=False, callbacks=[SyncEpoch(train)], ...)
    ```
    """

    def __init__(self, seed=0, padding=4, mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        _check_integer("seed", seed, 0)
        _check_integer("padding", padding, 0)
        self.seed = int(seed)
        self.padding = int(padding)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._table = _normalization_table(self.mean, self.std, len(self.mean))
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="augmentation_seed")

    def draw(self, n):
        """The next batch's offsets `(n, 2)` and flips `(n,)` (advances the
        generator)."""
        offsets = keras.random.randint((n, 2), 0, 2 * self.padding + 1, seed=self.seed_generator)
        flips = keras.random.uniform((n,), seed=self.seed_generator) < 0.5
        return offsets, flips

    def call(self, images, training=False):
        if images.shape[-1] != self._table.shape[0]:
            raise ValueError(
                f"DeviceAugmentation has {self._table.shape[0]} channel means; "
                f"the images have {images.shape[-1]} channels."
            )
        if training:
            offsets, flips = self.draw(keras.ops.shape(images)[0])
            images = device_crop(images, offsets, flips, self.padding)
        return device_normalize(images, self._table)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, images, training=False):
        return keras.KerasTensor(images.shape, dtype="float32")

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if "seed_state" in store:
            self.seed_generator.state.assign(np.asarray(store["seed_state"]))

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(seed=self.seed, padding=self.padding, mean=self.mean, std=self.std)
        return config


# Images per step in `CifarSequence`: small temporaries are reused by the
# memory allocator; whole batches of 128 images ran 2-3x slower, mostly in
# page faults (see benchmarks/input_pipeline.py).
_CHUNK = 64


class CifarSequence(keras.utils.PyDataset):
    """Seeded batches of normalized (and augmented) images for `fit()`.

    Batch `index` of epoch `epoch` is fully determined by
    `(seed, epoch, index)`: the epoch's order of the images is a
    permutation drawn from `(seed, epoch)` (if `shuffle`), and the crops
    and flips of the batch are drawn from `(seed, epoch, index)` (if
    `augment`). A batch does not depend on when or from which thread it
    is asked for, nor on any global random state, so two runs with the
    same seed train on identical data, and runs with different seeds on
    different data.

    The epoch. `sequence.epoch` (0 at first) is the epoch whose batches
    the sequence serves. The sequence never changes it itself; it is set

    - in `fit()`, the callback `SyncEpoch(sequence)`: as each epoch of
      `fit()` begins, it sets `epoch` to `fit()`'s epoch index, the one
      Keras passes to callbacks. That index is also right when `fit()`
      resumes a run (`fit(initial_epoch=k)`, or
      `keras.callbacks.BackupAndRestore`, which sets it from its backup),
      so epoch `e` of a resumed run trains on the same batches as epoch
      `e` of an uninterrupted one;
    - in a training loop of your own, you: `sequence.epoch = e` before
      asking for the batches of epoch `e`.

    Without either, every epoch gets the batches of `sequence.epoch`: the
    same order and the same crops and flips every epoch. When `fit()`
    iterates a shuffled or augmented sequence for which no `SyncEpoch` was
    created, the sequence warns once.

    For runs that must see identical data:

    - Pass `shuffle=False` to `fit()`. The sequence shuffles on its own;
      `fit()`'s default `shuffle=True` would also permute the order of the
      batches with Python's global `random` module.
    - Keep the default `workers=1` and `use_multiprocessing=False`. Then,
      on every backend, Keras asks for the batches of an epoch only after
      the callbacks' `on_epoch_begin` has run (TensorFlow's `tf.data`
      prefetching starts with the epoch's first batch), so `SyncEpoch`
      always comes first; `tests/test_data.py` checks this against a
      hand-written loop. With more workers, Keras's enqueuer (JAX, torch)
      keeps what it prefetched in one pass (the one that builds the model,
      then each epoch) and serves it at the start of the next epoch, so
      the epochs no longer get exactly their own batches. One thread makes
      over 100,000 augmented images per second, see
      `benchmarks/input_pipeline.py`.
    - Leave `fit()`'s `steps_per_epoch` unset (or `len(sequence)`), so
      that an epoch of `fit()` is one pass over the sequence.

    Args:
        x: uint8 images, shape `(n, height, width, channels)`.
        y: Integer labels, shape `(n,)` or `(n, 1)`.
        batch_size: Positive integer. The last batch of an epoch is
            smaller when `batch_size` does not divide `n`.
            Defaults to `128`.
        augment: Whether to apply `augment()` (random crop with 4 pixels of
            zero padding, random horizontal flip). Defaults to `False`.
        normalize: Whether to normalize the images. With `False` the
            batches hold the (augmented, if `augment`) uint8 pixels, for a
            model that normalizes them itself, such as one starting with
            `DeviceAugmentation`. Defaults to `True`.
        shuffle: Whether to draw a new order of the images every epoch.
            Defaults to `False`.
        seed: Non-negative integer. Defaults to `0`.
        mean: Per-channel means for `normalize()`.
            Defaults to `CIFAR_MEAN`.
        std: Per-channel standard deviations for `normalize()`.
            Defaults to `CIFAR_STD`.
        **kwargs: `keras.utils.PyDataset` arguments: `workers`,
            `use_multiprocessing`, `max_queue_size`.

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = keras_we.experiments.data.load_cifar()
    train = CifarSequence(x_train, y_train, augment=True, shuffle=True, seed=1)
    test = CifarSequence(x_test, y_test, batch_size=500)
    model.fit(
        train,
        validation_data=test,
        epochs=200,
        shuffle=False,
        callbacks=[SyncEpoch(train)],
    )
    ```

    Each batch is a tuple `(images, labels)`: float32 images (uint8 with
    `normalize=False`) of shape `(batch, height, width, channels)` and
    int32 labels of shape `(batch,)`.
    """

    def __init__(
        self,
        x,
        y,
        batch_size=128,
        augment=False,
        shuffle=False,
        seed=0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        normalize=True,
        **kwargs,
    ):
        if "initial_epoch" in kwargs:
            raise TypeError(
                "CifarSequence no longer takes `initial_epoch`. In fit(), pass "
                "SyncEpoch(sequence) as a callback: it sets `sequence.epoch` to "
                "fit's epoch index, also when fit resumes a run "
                "(fit(initial_epoch=k), keras.callbacks.BackupAndRestore). In "
                "a loop of your own, set `sequence.epoch` yourself."
            )
        super().__init__(**kwargs)
        x = np.asarray(x)
        y = np.asarray(y).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(
                "`x` must be a uint8 array of shape "
                "(n, height, width, channels). "
                f"Received: dtype={x.dtype}, shape={x.shape}"
            )
        if len(y) != len(x):
            raise ValueError(
                "`x` and `y` must have the same length. "
                f"Received: len(x)={len(x)}, len(y)={len(y)}"
            )
        if len(x) == 0:
            raise ValueError("`x` must hold at least one image.")
        for arg, value in (("batch_size", batch_size), ("seed", seed)):
            minimum = 1 if arg == "batch_size" else 0
            _check_integer(arg, value, minimum)
        self.x = x
        self.y = y.astype(np.int32)
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.shuffle = bool(shuffle)
        self.normalize = bool(normalize)
        self.seed = int(seed)
        self.epoch = 0
        self._table = _normalization_table(mean, std, x.shape[-1])
        self._cached_order = (None, None)
        # Whether a `SyncEpoch` was created for this sequence, and whether
        # the sequence has warned that none was.
        self._synced = False
        self._warned = False

    @property
    def epoch(self):
        """The epoch whose batches the sequence serves (an integer >= 0).

        Set by `SyncEpoch` in `fit()`, or by your own training loop; see
        the class documentation.
        """
        return self._epoch

    @epoch.setter
    def epoch(self, value):
        _check_integer("epoch", value, 0)
        # One attribute, read once per batch: safe with `workers > 1`.
        self._epoch = int(value)

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(
                f"Batch index {index} out of range [0, {len(self)})."
            )
        if index == 0 and keras.backend.backend() == "tensorflow":
            # The generator dataset serving this batch has patched malloc.
            undo_tf_malloc_patch()
        epoch = self.epoch
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self.x))
        if self.shuffle:
            rows = self.order(epoch)[start:stop]
        else:
            rows = np.arange(start, stop)
        if self.augment:
            # The same draws as `augment(x[rows], rng)`.
            rng = np.random.default_rng([self.seed, 4, epoch, index])
            offsets, flips = _draw_crops(rng, len(rows), padding=4)
        if not self.normalize:
            pixels = self.x[rows]
            if self.augment:
                pixels = np.ascontiguousarray(_crop(pixels, offsets, flips, padding=4))
            return pixels, self.y[rows]
        images = np.empty((len(rows),) + self.x.shape[1:], dtype=np.float32)
        for chunk in range(0, len(rows), _CHUNK):
            part = slice(chunk, chunk + _CHUNK)
            pixels = self.x[rows[part]]
            if self.augment:
                pixels = _crop(pixels, offsets[part], flips[part], padding=4)
            _normalize_into(pixels, self._table, images[part])
        return images, self.y[rows]

    def order(self, epoch=None):
        """Returns the order of the images in `epoch` (default: current).

        A permutation of `range(len(x))` drawn from `(seed, epoch)` when
        `shuffle` is on, else the identity.
        """
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(len(self.x))
        # One attribute, swapped at once: safe with `workers > 1` threads.
        cached_epoch, order = self._cached_order
        if cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, 3, epoch])
            order = rng.permutation(len(self.x))
            self._cached_order = (epoch, order)
        return order

    def on_epoch_begin(self):
        """Called by `fit()` (and `evaluate()`, `predict()`) as they start a
        pass over the sequence; leaves `epoch` as it is.

        Warns once if the sequence shuffles or augments and no `SyncEpoch`
        was created for it: every epoch would then get the same batches.
        """
        if (self.shuffle or self.augment) and not self._synced and not self._warned:
            self._warned = True
            warnings.warn(
                f"A CifarSequence with shuffle={self.shuffle}, augment="
                f"{self.augment} is iterated without SyncEpoch: every epoch "
                f"gets the batches of epoch {self.epoch} (the same order, "
                "crops and flips). Pass callbacks=[SyncEpoch(sequence)] to "
                "fit(), or set `sequence.epoch` yourself.",
                stacklevel=2,
            )


def _check_integer(arg, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{arg}` must be an integer >= {minimum}. "
            f"Received: {arg}={value!r}"
        )


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold its
# dynamic rule reaches on 64-bit machines (DEFAULT_MMAP_THRESHOLD_MAX).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024


def undo_tf_malloc_patch():
    """Gives glibc's allocator back the thresholds its dynamic rule reaches.

    TensorFlow's generator dataset (through which `fit` reads a
    `keras.utils.PyDataset` on TensorFlow) sets glibc's `M_TRIM_THRESHOLD`
    to 128 KB when it starts (TensorFlow 2.21 logs "Memory patch applied").
    Any `mallopt` call also turns off glibc's dynamic mmap threshold, so from
    then on every buffer over 128 KB, every activation of a CIFAR ResNet
    among them, is mapped and unmapped again with each step. On 2 CPU cores
    that made training 2.2x slower (62 against 138 images/s, 26.7 s against
    3.5 s of system CPU; `benchmarks/malloc_patch.py`). Setting both
    thresholds to where the dynamic rule would have taken them (32 MB and
    64 MB) restores the speed. Does nothing off glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)


@functools.cache
def _glibc():
    """glibc through ctypes, or None off Linux or on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (musl has no mallopt)
    except (OSError, AttributeError):
        return None
    return libc


class SyncEpoch(keras.callbacks.Callback):
    """Sets `sequence.epoch` to the epoch index of `fit()`.

    As each epoch of `fit()` begins, before Keras asks for its first batch,
    the sequence moves to `fit()`'s epoch index, the one Keras passes to
    every callback's `on_epoch_begin`. So epoch `e` of `fit()` trains on
    the batches of epoch `e` of the `CifarSequence`, also when `fit()`
    resumes a run (`fit(initial_epoch=k)`, or
    `keras.callbacks.BackupAndRestore`, which restarts at the epoch after
    its last backup). Its place in the list of callbacks does not matter.

    Args:
        sequence: The `CifarSequence` passed to `fit()` (or any object
            whose `epoch` attribute chooses the batches it serves).

    Example:

    ```python
    model.fit(train, epochs=200, shuffle=False, callbacks=[SyncEpoch(train)])
    ```
    """

    def __init__(self, sequence):
        super().__init__()
        if not hasattr(sequence, "epoch"):
            raise TypeError(
                "`sequence` must be a CifarSequence (or another object with "
                f"an `epoch` attribute). Received: {type(sequence).__name__}"
            )
        self.sequence = sequence
        if isinstance(sequence, CifarSequence):
            sequence._synced = True

    def on_epoch_begin(self, epoch, logs=None):
        self.sequence.epoch = epoch


def fit_input(sequence, prefetch=2):
    """What `fit()` should read for `sequence` on the current backend.

    On JAX and PyTorch, the sequence itself. On TensorFlow, a `tf.data`
    pipeline serving the same batches, `sequence[i]` for i in order, asked
    for as `fit()` reads them (so `SyncEpoch` still chooses the epoch),
    `prefetch` batches ahead, with tf.data's autotuning off.

    Why: `fit()` reads a `PyDataset` on TensorFlow through a generator
    dataset prefetched with autotuning, and autotuning runs a thread that
    wakes after 10 ms, 20 ms, 40 ms, ... Deleting an iterator waits for
    that thread's next wake, and `fit()` deletes the last epoch's iterator
    as the next epoch begins. With epochs of 10.3-10.5 s (ResNet-20 on 2
    CPU cores, 5,120 images) the wake after 10.24 s sometimes came just
    before the end and the next only 10.24 s later: every other epoch
    began with a 9-10 s pause, both cores idle (`benchmarks/throughput.py`,
    20.4 s against 10.6 s epochs). Kept alive, or with autotuning off,
    every epoch took 10.4-10.7 s. The pipeline also skips the generator
    dataset, whose start patches glibc's malloc thresholds (see
    `undo_tf_malloc_patch`).

    Args:
        sequence: A `CifarSequence` (or another `keras.utils.PyDataset`
            of `(images, labels)` batches with a length).
        prefetch: Positive integer, the batches prepared ahead while the
            model trains. Defaults to `2`.

    Example:

    ```python
    model.fit(fit_input(train), validation_data=fit_input(test), epochs=200,
              shuffle=False, callbacks=[SyncEpoch(train)])
    ```
    """
    _check_integer("prefetch", prefetch, 1)
    if keras.backend.backend() != "tensorflow":
        return sequence
    import tensorflow as tf

    images, labels = sequence[0]
    specs = (tf.TensorSpec((None,) + images.shape[1:], tf.as_dtype(images.dtype)),
             tf.TensorSpec((None,), tf.as_dtype(labels.dtype)))

    def batch(index):
        return sequence[int(index)]

    def load(index):
        loaded = tf.numpy_function(batch, [index], [spec.dtype for spec in specs], stateful=True)
        return tuple(tf.ensure_shape(tensor, spec.shape) for tensor, spec in zip(loaded, specs))

    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    dataset = tf.data.Dataset.range(len(sequence)).map(load).prefetch(prefetch)
    return dataset.with_options(options)


def make_datasets(
    name="cifar10",
    batch_size=128,
    seed=0,
    data_dir=None,
    train_size=None,
    test_size=None,
    augment=True,
    test_batch_size=500,
    **kwargs,
):
    """Loads CIFAR and wraps it in the paper's training and test pipelines.

    Args:
        name: `"cifar10"` or `"cifar100"`. Defaults to `"cifar10"`.
        batch_size: Training batch size. Defaults to `128` (the paper's).
        seed: Non-negative integer seeding the subsets, the epoch orders
            and the augmentation. Defaults to `0`.
        data_dir: See `load_cifar()`. Defaults to `None`.
        train_size: See `load_cifar()`. Defaults to `None` (all).
        test_size: See `load_cifar()`. Defaults to `None` (all).
        augment: Whether to augment the training images.
            Defaults to `True`.
        test_batch_size: Test batch size. Defaults to `500`.
        **kwargs: `keras.utils.PyDataset` arguments for the training
            sequence (`workers`, `use_multiprocessing`, `max_queue_size`).

    Returns:
        `(train, test)`: a shuffled, augmented `CifarSequence` of the
        training images, and an unshuffled, unaugmented one of the test
        images, e.g. for `model.fit(train, validation_data=test,
        shuffle=False, callbacks=[SyncEpoch(train)])` (see
        `CifarSequence` for what `SyncEpoch` does).
    """
    (x_train, y_train), (x_test, y_test) = load_cifar(
        name,
        data_dir=data_dir,
        train_size=train_size,
        test_size=test_size,
        seed=seed,
    )
    train = CifarSequence(
        x_train,
        y_train,
        batch_size=batch_size,
        augment=augment,
        shuffle=True,
        seed=seed,
        **kwargs,
    )
    test = CifarSequence(x_test, y_test, batch_size=test_batch_size)
    return train, test
