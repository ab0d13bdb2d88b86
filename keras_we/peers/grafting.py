"""External filter grafting: K networks trained side by side, each taking
part of the weights of the one before it after every epoch.

Filter grafting (Meng et al., CVPR 2020; public code `fxmeng/filter-grafting`,
`grafting_cifar/grafting.py`) trains K networks of one architecture, each
with its own optimizer, learning rate and data order. After every epoch
network `i` grafts the weights of network `i - 1` (a ring; with K = 2 a
swap) into its own, variable by variable,
`own <- w * own + (1 - w) * peer`, where the coefficient `w` favours the
network whose conv kernel holds more information (`entropy` of its values):
`w = round(a / pi * arctan(c * (H(own) - H(peer))) + 0.5, 2)`
(`grafting_coefficient`).

**Why a function, not a callback.** Each network is a whole `fit`: its own
model, optimizer, callbacks, learning rate and data. A callback on one
model would have to run the other networks' training inside it. So
`fit_grafted` runs the networks in lockstep epochs, one `model.fit` per
network per epoch, and calls `graft` between the epochs; `graft` alone
serves custom loops.

**K = 2.** With two networks `w_2 = 1 - w_1` (the arctan is odd), so after
every graft both networks hold the same weights (to float rounding); they
diverge again during the next epoch only through their learning rates,
momentum and data order. This is a property of the method, not a bug.

**Cost.** K times the training compute of one network (the grafts
themselves are negligible).

Pinned choices (PEERS.md, section 1a) are listed in the docstrings of
`entropy`, `grafting_coefficient`, `graft` and `fit_grafted`.
"""

import dataclasses
import json
import math
import os
import shutil

import keras
import numpy as np
from keras import ops

from keras_we.layers import walk_layers
from keras_we.peers.kernels import conv_kernels
from keras_we.validation import check_int, check_real

STATE_FILE = "grafting_state.json"


# ------------------------------------------------------------------ formulas


def entropy(x, bins=10):
    """The entropy of a tensor's value histogram, as the public code's
    `entropy()` computes it.

    The tensor is flattened; `scale = (max - min) / bins`; a value counts
    in bin `i` when `min + i * scale <= x < min + (i + 1) * scale`, so the
    maximum falls in no bin (as in the public code, whose edges, rounding
    included, these are: `min + i * scale` in the tensor's dtype; `p` still
    divides by all `n` values). `H = -sum p log p` (natural log) over the non-empty bins,
    `p = count / n`. A constant tensor has no non-empty bin: 0.0.

    Computed with `keras.ops`, all bins at once: the bin edges in the
    tensor's dtype (a non-float tensor is cast to `floatx`); `p` and `H` in
    that dtype, or float32 for a half-precision tensor (float16 cannot
    count past 2048). A tensor holding NaN or inf gives NaN.

    Example:

    ```python
    keras_we.peers.entropy(np.array([0.0, 1.0]))  # 0.5 * log(2): the max is in no bin
    ```

    Args:
        x: a tensor (any shape, not empty).
        bins: the number of bins, an integer >= 1. Defaults to 10.

    Returns:
        A Python float.
    """
    bins = check_int("bins", bins, minimum=1)
    x = ops.convert_to_tensor(x)
    if not keras.backend.is_float_dtype(x.dtype):
        x = ops.cast(x, keras.config.floatx())
    x = ops.reshape(x, (-1,))
    n = x.shape[0]
    if not n:
        raise ValueError("`x` must hold at least one value; got an empty tensor.")
    low = ops.min(x)
    scale = (ops.max(x) - low) / bins
    edges = low + ops.arange(bins + 1, dtype=x.dtype) * scale  # min + i * scale
    inside = ops.logical_and(x[None, :] >= edges[:-1, None], x[None, :] < edges[1:, None])
    counts = ops.sum(ops.cast(inside, "int32"), axis=1)
    dtype = keras.backend.result_type(x.dtype, "float32")
    p = ops.cast(counts, dtype) / n
    filled = counts > 0
    h = -ops.sum(ops.where(filled, p * ops.log(ops.where(filled, p, 1)), 0))
    h = ops.where(ops.all(ops.isfinite(x)), h, np.nan)
    return float(ops.convert_to_numpy(h))


def grafting_coefficient(own, peer, a=0.4, c=500):
    """The weight `w` a network keeps on its own values when it grafts a
    peer's: `w = round(a / pi * arctan(c * (H(own) - H(peer))) + 0.5, 2)`
    (`grafting_cifar/grafting.py`, `grafting()`; `H` is `entropy`).

    `w` lies in `(0.5 - a / 2, 0.5 + a / 2)`: (0.3, 0.7) with the defaults,
    0.5 for equal entropies. Rounded as the public code rounds it
    (pinned): a NumPy float64 rounded with `round(value, 2)`, i.e.
    NumPy's rounding (scale by 100, round half to even, scale back), which
    is not always Python's correctly rounded `round` of a float.

    Example:

    ```python
    w = keras_we.peers.grafting_coefficient(own_kernel, peer_kernel)
    mixed = w * own_kernel + (1 - w) * peer_kernel
    ```

    Args:
        own: the tensor of the network that grafts.
        peer: the same tensor of the network grafted from.
        a: the coefficient's range, a real number in [0, 1] (so that `w`
            stays in [0, 1]). Defaults to 0.4 (the public code's).
        c: the steepness, a real number >= 0. Defaults to 500 (the public
            code's).

    Returns:
        A Python float.
    """
    a, c = _check_a_c(a, c)
    return _coefficient(entropy(own), entropy(peer), a, c)


def learning_rates(lr, k):
    """The public code's different starting learning rates of K networks:
    `lr_i = lr * (1 + cos(pi * (k - i) / k)) / 2`, i = 1..k (network `k`
    starts at `lr`). `learning_rates(0.1, 2) == [0.05, 0.1]`.

    Example:

    ```python
    for model, rate in zip(models, learning_rates(0.1, len(models))):
        model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9), loss=...)
    ```

    Args:
        lr: the base learning rate, a real number > 0.
        k: the number of networks, an integer >= 2.

    Returns:
        A list of `k` Python floats.
    """
    lr = check_real("lr", lr, minimum=0, open_minimum=True)
    k = check_int("k", k, minimum=2)
    return [float(lr * ((1 + np.cos(np.pi * ((k - i) / k))) / 2)) for i in range(1, k + 1)]


def _coefficient(h_own, h_peer, a, c):
    value = a / np.pi * np.arctan(c * (h_own - h_peer)) + 0.5  # a NumPy float64
    return float(round(np.float64(value), 2))


def _check_a_c(a, c):
    return check_real("a", a, minimum=0, maximum=1), check_real("c", c, minimum=0)


# ------------------------------------------------------------------ graft


@dataclasses.dataclass(frozen=True)
class GraftReport:
    """What one graft did to one network.

    Attributes:
        coefficients: `w` of each conv kernel, in traversal order; 1.0
            (own values kept) for a kernel whose segment was skipped.
        skipped_nonfinite: segments left unchanged for non-finite values.
    """

    coefficients: tuple
    skipped_nonfinite: int

    @property
    def coefficient_mean(self):
        return float(np.mean(self.coefficients))

    def to_logs(self):
        return {"graft_coefficient_mean": self.coefficient_mean,
                "graft_skipped_nonfinite": self.skipped_nonfinite}


IDLE_LOGS = {"graft_coefficient_mean": 0.0, "graft_skipped_nonfinite": 0}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The variables one network grafts, in traversal order, each with the
    index of the conv kernel whose `w` it takes (its segment)."""

    variables: list
    segments: list
    kernels: list  # position in `variables` of conv kernel j

    def signature(self):
        return [(v.name, tuple(v.shape), keras.backend.standardize_dtype(v.dtype), s, j in self.kernels)
                for j, (v, s) in enumerate(zip(self.variables, self.segments))]


def _plan(model, index):
    kernels = {id(t.variable): j for j, t in enumerate(conv_kernels(model))}
    if not kernels:
        raise ValueError(f"`models[{index}]` has no trainable conv kernel to compute the "
                         "grafting coefficient from.")
    trainable = {id(v) for v in model.trainable_variables}
    frozen, moving = set(), set()
    for layer in walk_layers(model):
        if not layer.trainable:
            frozen.update(id(v) for v in layer.weights)
        elif isinstance(layer, keras.layers.BatchNormalization):
            moving.update(id(v) for v in layer.non_trainable_weights)
    variables, segments, positions = [], [], {}
    segment = 0  # the first conv's `w` for anything before it
    # `model.weights` lists every layer's own variables, then its
    # sublayers', depth-first: the traversal order of `walk_layers`.
    for v in model.weights:
        if (id(v) in frozen or not keras.backend.is_float_dtype(v.dtype)
                or (id(v) not in trainable and id(v) not in moving)):
            continue
        if id(v) in kernels:
            segment = kernels[id(v)]
            positions[segment] = len(variables)
        variables.append(v)
        segments.append(segment)
    return _Plan(variables, segments, [positions[j] for j in range(len(kernels))])


def _plans(models):
    plans = [_plan(model, i) for i, model in enumerate(models)]
    first = plans[0].signature()
    for i, plan in enumerate(plans[1:], start=1):
        mine = plan.signature()
        if len(mine) != len(first):
            raise ValueError(
                f"`models` must share one architecture; `models[{i}]` grafts {len(mine)} "
                f"variables, `models[0]` {len(first)}.")
        for j, (ours, theirs) in enumerate(zip(mine, first)):
            if ours != theirs:
                raise ValueError(
                    f"`models` must share one architecture; grafted variable {j} differs: "
                    f"`models[{i}]` has {plan.variables[j].path} {ours[:3]}, "
                    f"`models[0]` {plans[0].variables[j].path} {theirs[:3]}.")
    return plans


def _check_models(models):
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, keras.Model) for m in models):
        raise TypeError(f"`models` must be a list of Keras models; got {models!r}.")
    if len(models) < 2:
        raise ValueError(f"`models` must hold at least 2 models (K >= 2); got {len(models)}.")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("`models` must be distinct models; one model appears twice.")
    return list(models)


def graft(models, a=0.4, c=500):
    """Grafts K networks once, in a ring: network `i` takes network `i - 1`'s
    weights (network 0 takes network K - 1's; with K = 2 they swap).

    All weights are read first, so every network grafts its peer's weights
    as they were before that peer grafted (the public code loads the
    peer's checkpoint saved before its graft). Then, variable by variable,
    `own <- w * own + (1 - w) * peer` with `w = grafting_coefficient`.
    With K = 2 both networks then hold the same weights (to float
    rounding): `w_2 = 1 - w_1`; see the module docstring.

    **Pinned choices.**
    - `w` is computed for each conv kernel (`keras_we.peers.kernels.
      conv_kernels`: Conv1D/2D/3D, DepthwiseConv, both SeparableConv
      kernels; the public code takes the state-dict entries named `conv`).
      Every other grafted variable (bias, the BatchNorm that follows,
      moving statistics included, Dense kernels and biases) takes the `w`
      of the nearest conv kernel before it in traversal order, the first
      conv's `w` for anything before it.
    - Grafted: the model's trainable variables and the moving statistics of
      trainable BatchNormalization layers. Never a variable of a layer set
      `trainable = False`, never optimizer state, never an integer
      variable.
    - A segment (a conv kernel and the variables that take its `w`) holding
      a NaN or inf, in the network's or its peer's values, is left
      unchanged in that network (its `w` reads 1.0) and counted.
    - The models must have the same architecture: the same grafted
      variables in the same order, with the same names, shapes and dtypes
      (layer names may differ: Keras numbers them per session).

    Example:

    ```python
    reports = keras_we.peers.graft([model_1, model_2])
    print(reports[0].coefficients, reports[0].to_logs())
    ```

    Args:
        models: K >= 2 built Keras models of one architecture.
        a: the coefficient's range, in [0, 1]. Defaults to 0.4.
        c: the coefficient's steepness, >= 0. Defaults to 500.

    Returns:
        One `GraftReport` per model: `coefficients` (`w` per conv kernel),
        `skipped_nonfinite`, `coefficient_mean` and `to_logs()`.
    """
    models = _check_models(models)
    a, c = _check_a_c(a, c)
    for i, model in enumerate(models):
        if not model.built:
            raise ValueError(f"`models[{i}]` is not built; build it (or train it) before grafting.")
    plans = _plans(models)
    snapshots = [[ops.copy(ops.convert_to_tensor(v)) for v in plan.variables] for plan in plans]
    segments = plans[0].segments
    kernels = plans[0].kernels
    finite = []  # per network: whether each segment is finite
    for values in snapshots:
        each = ops.convert_to_numpy(ops.stack([ops.all(ops.isfinite(v)) for v in values]))
        finite.append([all(ok for ok, s in zip(each, segments) if s == j) for j in range(len(kernels))])
    entropies = [[entropy(values[p]) if ok else math.nan for p, ok in zip(kernels, flags)]
                 for values, flags in zip(snapshots, finite)]
    reports = []
    for i, plan in enumerate(plans):
        own, peer = snapshots[i], snapshots[i - 1]
        usable = [mine and theirs for mine, theirs in zip(finite[i], finite[i - 1])]
        coefficients = [_coefficient(h_own, h_peer, a, c) if ok else 1.0
                        for h_own, h_peer, ok in zip(entropies[i], entropies[i - 1], usable)]
        for variable, segment, mine, theirs in zip(plan.variables, segments, own, peer):
            if usable[segment]:
                w = coefficients[segment]
                variable.assign(mine * w + theirs * (1 - w))
        reports.append(GraftReport(tuple(coefficients), usable.count(False)))
    return reports


# ------------------------------------------------------------------ training


class _GraftLogs(keras.callbacks.Callback):
    """Adds the preceding graft's logs to an epoch's logs (first in the
    callbacks list, so History, CSVLogger and the rest see them)."""

    def __init__(self, logs):
        super().__init__()
        self.logs = logs

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.logs)


def fit_grafted(models, x, y=None, *, epochs, callbacks=None, validation_data=None,
                a=0.4, c=500, backup_dir=None, verbose=1, **fit_kwargs):
    """Trains K compiled networks with external filter grafting.

    The networks train in lockstep epochs: for each epoch `e`, each network
    `i` runs `model.fit(x_i, y_i, initial_epoch=e, epochs=e + 1,
    callbacks=callbacks[i], validation_data=..., verbose=verbose,
    **fit_kwargs)`; then, if another epoch follows, `graft(models, a, c)`
    (see `graft` for what it mixes). A function, not a callback: each
    network is a whole `fit` with its own optimizer, callbacks and data, so
    a callback on one model would have to run the others' training inside
    it. Cost: K times the training of one network. With K = 2 both
    networks hold the same weights after each graft and diverge again
    through learning rate, momentum and data order (a property of the
    method). Give the networks different starting rates with
    `keras_we.peers.grafting.learning_rates` (the public code's default)
    and different data orders (per-network `x`, or shuffling).

    **Pinned choices.**
    - No graft after the last epoch: the returned networks hold the
      weights they trained. (The public code also grafts after its last
      epoch, after testing and saving it, so its reported accuracy is the
      same.)
    - Per-network data: `x`, `y` or `validation_data` given as a list or
      tuple of K items is one item per network; anything else is shared
      (`validation_data`: a tuple of K items none of which is an array or a
      dict, so `(x_val, y_val)` is shared). Give a multi-input model's
      inputs as a dict.
    - Each `fit` call is one epoch: callbacks that reset in
      `on_train_begin` (`EarlyStopping`'s patience, `ReduceLROnPlateau`)
      see one epoch at a time; `CSVLogger` needs `append=True`. A network
      whose `fit` sets `stop_training` (`TerminateOnNaN`) ends the run for
      all after that epoch (the other networks still train it).
    - With `backup_dir`, after each epoch (and its graft) each network's
      weights and optimizer state (`model.save_weights` stores both), the
      histories and the finished epoch are written there, atomically. A
      later call with the same `backup_dir` resumes at the next epoch,
      bit for bit, when the data order is deterministic (the random
      number generators of shuffling and dropout are not saved). A backup
      of a run that ended at its last epoch is kept: a call with more
      `epochs` grafts and continues it.

    **Logs.** Each epoch's logs (and the returned histories) hold what the
    graft before that epoch did to the network: `graft_coefficient_mean`
    (mean `w` over its conv kernels; 0.0 at epoch 0) and
    `graft_skipped_nonfinite` (segments left unchanged).

    Example:

    ```python
    models = [build_model(seed) for seed in (1, 2)]
    for model, rate in zip(models, keras_we.peers.grafting.learning_rates(0.1, 2)):
        model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    histories = keras_we.peers.fit_grafted(
        models, x, y, epochs=200, batch_size=128, validation_data=(x_test, y_test))
    ```

    Args:
        models: K >= 2 compiled Keras models of one architecture, each with
            its own optimizer.
        x: training inputs for `fit`, shared, or a list of K (one per
            network).
        y: targets, shared, or a list of K. Defaults to None.
        epochs: the number of epochs, an integer >= 1.
        callbacks: None, or a list of K lists of callbacks (one list per
            network). Defaults to None.
        validation_data: as for `fit`, shared, or a list of K.
        a: the coefficient's range, in [0, 1]. Defaults to 0.4.
        c: the coefficient's steepness, >= 0. Defaults to 500.
        backup_dir: a folder to back the run up to and resume it from, or
            None. Defaults to None.
        verbose: `fit`'s `verbose`; 1 also prints each graft. Defaults to 1.
        **fit_kwargs: passed to every `fit` (`batch_size`, `shuffle`, ...);
            not `initial_epoch` (resume with `backup_dir`).

    Returns:
        K `keras.callbacks.History` objects whose `.history` covers all
        epochs of the run (those restored from `backup_dir` included).
    """
    models = _check_models(models)
    k = len(models)
    epochs = check_int("epochs", epochs, minimum=1)
    a, c = _check_a_c(a, c)
    if verbose != "auto":
        verbose = check_int("verbose", verbose, minimum=0)
    if backup_dir is not None and not isinstance(backup_dir, (str, os.PathLike)):
        raise TypeError(f"`backup_dir` must be None or a folder path; got {backup_dir!r}.")
    if "initial_epoch" in fit_kwargs:
        raise ValueError("`initial_epoch` is set by fit_grafted (lockstep epochs); "
                         "resume a run with `backup_dir`.")
    for i, model in enumerate(models):
        if not getattr(model, "compiled", False):
            raise ValueError(f"`models[{i}]` is not compiled; compile each model with its own optimizer.")
    if len({id(m.optimizer) for m in models}) != k:
        raise ValueError("`models` must each have their own optimizer; two share one.")
    if all(m.built for m in models):
        _plans(models)  # a different architecture fails now, not after an epoch
    xs, ys = _per_network("x", x, k), _per_network("y", y, k)
    validations = _per_network("validation_data", validation_data, k, validation=True)
    callbacks = _check_callbacks(callbacks, k)

    run = _Run(k)
    if backup_dir is not None:
        backup_dir = os.fspath(backup_dir)
        run = _restore(backup_dir, models) or run
    if run.pending_graft and not run.stopped and run.next_epoch < epochs:
        run.graft_logs = _graft_logs(models, a, c, run.next_epoch - 1, verbose)
    for epoch in range(run.next_epoch if not run.stopped else epochs, epochs):
        stop = False
        for i, model in enumerate(models):
            if verbose:
                print(f"Epoch {epoch + 1}/{epochs}, network {i + 1}/{k}")
            history = model.fit(
                xs[i], ys[i], initial_epoch=epoch, epochs=epoch + 1,
                callbacks=[_GraftLogs(run.graft_logs[i]), *callbacks[i]],
                validation_data=validations[i], verbose=verbose, **fit_kwargs)
            run.add(i, history)
            stop = stop or bool(getattr(model, "stop_training", False))
        run.stopped = stop
        run.next_epoch = epoch + 1
        run.pending_graft = not stop
        if epoch + 1 < epochs and not stop:
            run.graft_logs = _graft_logs(models, a, c, epoch, verbose)
            run.pending_graft = False
        if backup_dir is not None:
            _backup(backup_dir, models, run)
        if stop:
            break
    return run.histories(models)


def _graft_logs(models, a, c, epoch, verbose):
    reports = graft(models, a, c)
    if verbose:
        means = ", ".join(f"{r.coefficient_mean:.3f}" for r in reports)
        skipped = sum(r.skipped_nonfinite for r in reports)
        print(f"Grafted after epoch {epoch + 1}: mean w per network {means}"
              + (f", {skipped} segments skipped (non-finite)" if skipped else ""))
    return [r.to_logs() for r in reports]


def _per_network(name, value, k, validation=False):
    if isinstance(value, (list, tuple)) and len(value) == k:
        if not validation or not any(hasattr(v, "shape") or isinstance(v, dict) for v in value):
            return list(value)
    return [value] * k


def _check_callbacks(callbacks, k):
    if callbacks is None:
        return [[] for _ in range(k)]
    allowed = f"None or a list of {k} lists of callbacks, one per network"
    if not isinstance(callbacks, (list, tuple)) or len(callbacks) != k:
        raise ValueError(f"`callbacks` must be {allowed}; got {callbacks!r}.")
    lists = []
    for item in callbacks:
        item = [] if item is None else item
        if not isinstance(item, (list, tuple)) or not all(
                isinstance(cb, keras.callbacks.Callback) for cb in item):
            raise ValueError(f"`callbacks` must be {allowed}; got {callbacks!r}.")
        lists.append(list(item))
    return lists


class _Run:
    """Where a grafted run stands: the next epoch, each network's history,
    the logs of the graft before the next epoch."""

    def __init__(self, k):
        self.k = k
        self.next_epoch = 0
        self.stopped = False
        self.pending_graft = False  # the last epoch trained was not grafted after
        self.graft_logs = [dict(IDLE_LOGS) for _ in range(k)]
        self.epochs = [[] for _ in range(k)]
        self.logs = [{} for _ in range(k)]
        self.params = [None] * k

    def add(self, i, history):
        self.epochs[i] += list(history.epoch)
        for key, values in history.history.items():
            self.logs[i].setdefault(key, []).extend(
                v if isinstance(v, (int, float)) else float(v) for v in values)
        self.params[i] = history.params

    def histories(self, models):
        result = []
        for i, model in enumerate(models):
            history = keras.callbacks.History()
            history.set_model(model)
            history.epoch = list(self.epochs[i])
            history.history = {key: list(values) for key, values in self.logs[i].items()}
            history.params = self.params[i]
            result.append(history)
        return result

    def to_json(self):
        return {"k": self.k, "next_epoch": self.next_epoch, "stopped": self.stopped,
                "pending_graft": self.pending_graft, "graft_logs": self.graft_logs,
                "epochs": self.epochs, "logs": self.logs, "params": self.params}

    @classmethod
    def from_json(cls, state):
        run = cls(state["k"])
        for key in ("next_epoch", "stopped", "pending_graft", "graft_logs", "epochs", "logs", "params"):
            setattr(run, key, state[key])
        return run


def _weights_file(folder, i):
    return os.path.join(folder, f"network_{i}.weights.h5")


def _backup(backup_dir, models, run):
    """Writes the run's state to `backup_dir/epoch_<e>/`, then points
    `STATE_FILE` at it by an atomic rename: an interruption leaves the
    previous backup in force."""
    name = f"epoch_{run.next_epoch - 1}"
    folder = os.path.join(backup_dir, name)
    shutil.rmtree(folder, ignore_errors=True)  # a half-written one
    os.makedirs(folder)
    for i, model in enumerate(models):
        model.save_weights(_weights_file(folder, i))  # the optimizer's state included
    state = run.to_json()
    state["folder"] = name
    state["iterations"] = [int(ops.convert_to_numpy(m.optimizer.iterations)) for m in models]
    path = os.path.join(backup_dir, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)
    for entry in os.listdir(backup_dir):
        if entry.startswith("epoch_") and entry != name:
            shutil.rmtree(os.path.join(backup_dir, entry), ignore_errors=True)


def _restore(backup_dir, models):
    """Loads the backup of `backup_dir` into `models`; returns its `_Run`,
    or None when there is none."""
    path = os.path.join(backup_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        state = json.load(f)
    if state["k"] != len(models):
        raise ValueError(f"`backup_dir` holds a run of {state['k']} networks; "
                         f"`models` has {len(models)}.")
    folder = os.path.join(backup_dir, state["folder"])
    for i, model in enumerate(models):
        if not model.optimizer.built:  # else its saved state would be skipped
            model.optimizer.build(model.trainable_variables)
        model.load_weights(_weights_file(folder, i))
        iterations = int(ops.convert_to_numpy(model.optimizer.iterations))
        if iterations != state["iterations"][i]:
            raise ValueError(f"The optimizer state of network {i} in `backup_dir` did not load "
                             f"(iterations {iterations}, saved {state['iterations'][i]}).")
    return _Run.from_json(state)
