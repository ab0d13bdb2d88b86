"""`RePr`: prune the most redundant filters for a while, then re-initialize
them orthogonally (Prakash et al., CVPR 2019)."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_we import layouts
from keras_we.after_epoch import AfterEpochCallback
from keras_we.backend_utils import stable_argsort
from keras_we.layers import batch_norm_after, evolvable_of, walk_layers
from keras_we.peers.kernels import HeldZeros, conv_kernels, is_finite
from keras_we.validation import check_int, check_real

STATE_FILE = "repr_state.json"
KEYS = ("repr_pruned_filters", "repr_held_filters", "repr_reinitialized_filters",
        "repr_reinit_not_orthogonal", "repr_skipped_nonfinite")


def redundancy_scores(rows):
    """RePr's inter-filter orthogonality score of each filter of one layer.

    `rows` is the layer's `(J, n)` matrix of filters (`layout.filter_rows`).
    Each row is L2-normalized to `W_hat` (a zero row stays zero), then
    `P = |W_hat W_hat^T - I|` and `O_f = sum_j P[f, j] / J`: the mean
    absolute cosine of filter `f` with the others (a zero filter scores
    `1 / J`, from its diagonal). The higher, the more redundant.
    """
    count = rows.shape[0]
    norms = ops.sqrt(ops.sum(ops.square(rows), axis=1, keepdims=True))
    unit = rows / ops.where(norms > 0, norms, ops.ones_like(norms))
    p = ops.abs(ops.matmul(unit, ops.transpose(unit)) - ops.eye(count, dtype=rows.dtype))
    return ops.sum(p, axis=1) / count


def select_redundant(scores, prune_ratio):
    """The filters RePr drops, ranked over all layers together.

    `scores` holds one 1-D score tensor per layer (`redundancy_scores`).
    Each layer's least redundant filter (lowest score, the first on ties)
    is kept; of all the others, the `floor(prune_ratio * total)` highest
    scores are dropped (`total` counts every filter; fewer if fewer are
    left), ties going to the filter that comes first. Returns one sorted
    NumPy int array per layer.
    """
    if not scores:
        return []
    sizes = [int(s.shape[0]) for s in scores]
    count = min(math.floor(prune_ratio * sum(sizes) + 1e-9), sum(sizes) - len(sizes))
    candidates = []
    for s in scores:
        s = ops.cast(s, "float32")
        least = ops.one_hot(ops.argmin(s), s.shape[0]) > 0
        candidates.append(ops.where(least, -np.inf, s))
    order = ops.convert_to_numpy(stable_argsort(-ops.concatenate(candidates)))
    chosen = np.sort(order[:max(count, 0)])
    starts = np.cumsum([0] + sizes)
    return [chosen[(chosen >= a) & (chosen < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def orthogonal_rows(constraints, count, seed):
    """`count` orthonormal rows orthogonal to the rows of `constraints`.

    Random Gaussian rows (stateless, from the integer `seed`) are put after
    `constraints` and orthonormalized in that order (Householder QR, which
    is Gram-Schmidt done stably): each new row is orthogonal to every
    constraint and to the new rows before it. Needs
    `len(constraints) + count <= n` (the row length).
    """
    width = constraints.shape[1]
    noise = keras.random.normal((count, width), dtype=constraints.dtype, seed=seed)
    q, _ = ops.qr(ops.transpose(ops.concatenate([constraints, noise], axis=0)), mode="reduced")
    return ops.transpose(q[:, constraints.shape[0]:])


def initializer_std(initializer, shape):
    """The standard deviation of the values `initializer` draws for a
    kernel of `shape` (`(*spatial, in, out)`), or None when unknown.

    `VarianceScaling` and its subclasses (`glorot_uniform`, `he_normal`,
    `lecun_normal`, ...): `sqrt(scale / fan)`, the fans being
    `prod(spatial) * in` and `prod(spatial) * out` as Keras computes them;
    `RandomNormal` and `TruncatedNormal`: their `stddev`; `RandomUniform`:
    `(maxval - minval) / sqrt(12)`.
    """
    initializer = keras.initializers.get(initializer) if initializer is not None else None
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    if isinstance(initializer, keras.initializers.VarianceScaling):
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
        return math.sqrt(initializer.scale / max(1.0, fan[initializer.mode]))
    if isinstance(initializer, (keras.initializers.RandomNormal, keras.initializers.TruncatedNormal)):
        return float(initializer.stddev)
    if isinstance(initializer, keras.initializers.RandomUniform):
        return (initializer.maxval - initializer.minval) / math.sqrt(12)
    return None


def repr_seed(epoch, index):
    """The integer seed of the random directions of ranked kernel `index`
    re-initialized after `epoch` (NumPy's `SeedSequence`)."""
    return int(np.random.SeedSequence([epoch, index]).generate_state(1)[0] >> 1)


class RePr(AfterEpochCallback):
    """Prunes the most redundant conv filters for a while, then
    re-initializes them orthogonally to the others.

    RePr (Prakash et al., "RePr: Improved Training of Convolutional
    Filters", CVPR 2019) trains the full network, then drops the filters
    that overlap most with the others of their layer and trains the rest
    on alone, then brings the dropped filters back in directions the
    network does not cover yet, and repeats. There is no official code for
    ResNets; what follows is pinned from the paper (PEERS.md, section 2).

    **Schedule** (pinned). Cycles of `train_epochs` epochs of full training
    and `prune_epochs` epochs with the dropped filters held at zero, then
    re-initialization. In 0-based epochs, with `P = train_epochs +
    prune_epochs`, cycle `k` covers epochs `[k*P, (k+1)*P)`: the drop
    happens after epoch `k*P + train_epochs - 1`, the re-initialization
    after epoch `(k+1)*P - 1`, and the cycle runs only if `(k+1)*P <=
    last_epoch` (the last learning-rate milestone, 180 of 200), so the
    network trains whole after the last one. The defaults (20, 10, 180) are
    the pinned ones for the 200-epoch CIFAR protocol; `RePr.scaled(epochs)`
    scales them. Both actions run as the next epoch begins
    (`AfterEpochCallback`), never after the last epoch that ran.

    **Ranking** (pinned). Every trainable conv kernel
    (`keras_we.peers.kernels.conv_kernels`) takes part except the
    network's first conv kernel (in traversal order, trainable or not) and
    depthwise kernels: a depthwise layer has one filter per group, so its
    filters have nothing in their group to be compared with. Each kernel is
    seen as its `(J, n)` matrix of filters (`layout.filter_rows`, `n =
    spatial * in`), and each filter scores `O_f = sum_j P[f, j] / J` with
    `P = |W_hat W_hat^T - I|`, `W_hat` the L2-normalized rows
    (`redundancy_scores`). All filters of the network are ranked together
    and the `floor(prune_ratio * total)` highest scores (the most
    redundant) are dropped, but never all filters of a layer: each layer's
    lowest-scoring filter is always kept (`select_redundant`).

    **Pruned phase** (pinned). At the drop and after every training batch
    until the re-initialization, the dropped filters' kernel columns and
    the gamma and beta of the BatchNormalization that normalizes their
    output (`keras_we.layers.batch_norm_after`) are set to exactly zero,
    so the optimizer's momentum and weight decay cannot move them. A conv
    bias, the optimizer's state and the BatchNorm's moving statistics are
    left as they are.

    **Re-initialization** (pinned). In each layer, the `d` dropped filters
    get orthonormal directions orthogonal to the rows `[kept filters now;
    dropped filters' values before the drop]` (`J` rows): random Gaussian
    rows (seeded by the epoch and the layer's index, `repr_seed`, so a
    resumed run draws the same) orthonormalized after them by QR
    (`orthogonal_rows`). Where they do not fit (`J + d > n`), the directions
    are orthogonal to the first `n - d` of those rows, the kept filters
    coming first in ascending score order (the most unique first); such
    filters are counted in `repr_reinit_not_orthogonal` (and, in a layer
    with more dropped filters than `n`, the directions are only random unit
    rows). Each direction is scaled to norm `std * sqrt(n)`, so its values
    have the root mean square of the layer's initializer's standard
    deviation `std` (`initializer_std`: `VarianceScaling` kinds such as
    the default `glorot_uniform` and `he_normal` from the kernel's fans,
    `RandomNormal`/`TruncatedNormal` their `stddev`, `RandomUniform` its
    range; any other initializer: the standard deviation of the layer's
    kept filters' values). Their BatchNorm gamma goes back to 1 and beta to
    0; its moving statistics are left as they are.

    **Frozen and non-finite.** Frozen (`trainable=False`) variables are
    never ranked or written (a frozen BatchNorm is not held at zero). A
    kernel holding a NaN or infinite value is left out of the ranking (and
    left alone at re-initialization) and counted.

    **State.** The dropped filters and their values before the drop carry
    across epochs (`get_state`, JSON lists); with a `backup_dir`, a run
    resumed by `keras.callbacks.BackupAndRestore` holds and re-initializes
    the same filters and ends with the same weights.

    **Logs.** Each epoch adds what the action before it did (zeros for
    epoch 0): `repr_pruned_filters` (dropped), `repr_reinitialized_filters`,
    `repr_reinit_not_orthogonal` (of those, not orthogonal to all the rows
    above), `repr_skipped_nonfinite` (kernels left alone), and
    `repr_held_filters` (the filters held at zero during the epoch).

    Example:

    ```python
    model.fit(x, y, epochs=200, callbacks=[keras_we.peers.RePr()])
    model.fit(x, y, epochs=30, callbacks=[keras_we.peers.RePr.scaled(30)])
    ```

    Args:
        prune_ratio: the fraction of all ranked filters dropped in each
            cycle, in [0, 1). Defaults to 0.3.
        train_epochs: epochs of full training in each cycle, >= 1.
            Defaults to 20.
        prune_epochs: epochs with the dropped filters held at zero in each
            cycle, >= 1. Defaults to 10.
        last_epoch: a cycle runs only if it ends at or before this epoch
            count, >= 0. Defaults to 180.
        verbose: 1 prints one line per action. Defaults to 0.
        backup_dir: a folder where the callback keeps its state after each
            epoch, for `keras.callbacks.BackupAndRestore`. Defaults to None.
    """

    state_file = STATE_FILE

    def __init__(self, prune_ratio=0.3, train_epochs=20, prune_epochs=10, last_epoch=180,
                 verbose=0, backup_dir=None):
        super().__init__(backup_dir=backup_dir, verbose=verbose)
        self.prune_ratio = check_real("prune_ratio", prune_ratio, minimum=0)
        if self.prune_ratio >= 1:
            raise ValueError(f"`prune_ratio` must be a real number in [0, 1); got {prune_ratio!r}.")
        self.train_epochs = check_int("train_epochs", train_epochs, minimum=1)
        self.prune_epochs = check_int("prune_epochs", prune_epochs, minimum=1)
        self.last_epoch = check_int("last_epoch", last_epoch, minimum=0)
        self._dropped = {}  # kernel path -> sorted filter indices
        self._before = {}  # kernel path -> their rows before the drop
        self._held = None

    @classmethod
    def scaled(cls, epochs, reference_epochs=200, lr_milestones=(60, 120, 180), **kwargs):
        """The pinned schedule scaled to a run of `epochs` epochs.

        With `s = epochs / reference_epochs`: `train_epochs = max(1,
        round(20 * s))`, `prune_epochs = max(1, round(10 * s))`,
        `last_epoch = round(max(lr_milestones) * s)` (the last learning-rate
        milestone, scaled as `Recipe` scales it). `RePr.scaled(8)`: 1, 1, 7.
        Other keyword arguments go to `RePr`.
        """
        check_int("epochs", epochs, minimum=1)
        check_int("reference_epochs", reference_epochs, minimum=1)
        milestones = tuple(lr_milestones) if isinstance(lr_milestones, (tuple, list)) else ()
        if not milestones or not all(
                isinstance(m, numbers.Real) and not isinstance(m, bool) and m >= 0 for m in milestones):
            raise ValueError(
                f"`lr_milestones` must be a non-empty sequence of epochs >= 0; got {lr_milestones!r}.")
        s = epochs / reference_epochs
        return cls(train_epochs=max(1, round(20 * s)), prune_epochs=max(1, round(10 * s)),
                   last_epoch=round(max(milestones) * s), **kwargs)

    # ------------------------------------------------------------ schedule

    def phase(self, epoch):
        """`"drop"`, `"reinit"` or None: the action after 0-based `epoch`."""
        period = self.train_epochs + self.prune_epochs
        cycle, offset = divmod(epoch, period)
        if epoch < 0 or (cycle + 1) * period > self.last_epoch:
            return None
        if offset == self.train_epochs - 1:
            return "drop"
        return "reinit" if offset == period - 1 else None

    def scheduled(self, epoch):
        return self.phase(epoch) is not None

    # ------------------------------------------------------------ state

    def get_state(self):
        """The dropped filters and their values before the drop, as a
        JSON-able dict of lists keyed by kernel path."""
        return {"dropped": {path: list(ix) for path, ix in self._dropped.items()},
                "before": {path: rows for path, rows in self._before.items()}}

    def set_state(self, state):
        """Restores a state saved by `get_state`."""
        if not isinstance(state, dict) or set(state) != {"dropped", "before"}:
            raise ValueError(f"A RePr state has keys 'dropped' and 'before'; got {state!r:.200}.")
        self._dropped = {p: [int(i) for i in ix] for p, ix in state["dropped"].items()}
        self._before = {p: [list(map(float, row)) for row in rows]
                        for p, rows in state["before"].items()}
        self._held = None

    def held_filters(self):
        """The number of filters held at zero now."""
        return sum(len(ix) for ix in self._dropped.values())

    # ------------------------------------------------------------ actions

    def act(self, epoch):
        """Drops or re-initializes filters after `epoch` (see `AfterEpochCallback`)."""
        return self.drop(epoch) if self.phase(epoch) == "drop" else self.reinitialize(epoch)

    def idle_logs(self):
        return {**dict.fromkeys(KEYS, 0), "repr_held_filters": self.held_filters()}

    def on_train_begin(self, logs=None):
        self._held = None
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        if self._dropped:
            self.write_after_batch(self._holder().apply)

    def drop(self, epoch):
        """Ranks the filters and drops the most redundant (see the class)."""
        targets, skipped = [], 0
        for target in self._ranked():
            if is_finite(target.variable.value):
                targets.append(target)
            else:
                skipped += 1
        rows = [ops.cast(t.layout.filter_rows(t.variable.value), "float32") for t in targets]
        chosen = select_redundant([redundancy_scores(r) for r in rows], self.prune_ratio)
        self._dropped, self._before = {}, {}
        for target, r, ix in zip(targets, rows, chosen):
            if len(ix):
                self._dropped[target.path] = [int(i) for i in ix]
                before = ops.take(r, ops.convert_to_tensor(ix, "int32"), axis=0)
                self._before[target.path] = ops.convert_to_numpy(before).tolist()
        self._held = None
        if self._dropped:
            self._holder().apply()
        return {**self.idle_logs(), "repr_pruned_filters": self.held_filters(),
                "repr_skipped_nonfinite": skipped}

    def reinitialize(self, epoch):
        """Gives the dropped filters new orthogonal directions (see the class)."""
        layer_of = _layers_of_variables(self.model)
        entries = _batch_norm_entries(self.model, layer_of)
        count = not_orthogonal = skipped = 0
        for index, target in enumerate(self._ranked()):
            if target.path not in self._dropped:
                continue
            variable, layout = target.variable, target.layout
            if not is_finite(variable.value):
                skipped += 1
                continue
            dropped = self._dropped[target.path]
            dtype = "float64" if variable.dtype == "float64" else "float32"
            rows = ops.cast(layout.filter_rows(variable.value), dtype)
            filters, width = rows.shape
            d = len(dropped)
            hot = ops.one_hot(ops.convert_to_tensor(dropped, "int32"), filters, dtype=dtype)
            keep = 1 - ops.sum(hot, axis=0)
            # Kept filters, most unique first, then the values before the drop.
            scores = ops.where(keep > 0, redundancy_scores(rows), np.inf)
            kept = ops.take(rows, stable_argsort(scores)[:filters - d], axis=0)
            if d > width:  # more filters than directions: random unit rows
                noise = keras.random.normal((d, width), dtype=dtype, seed=repr_seed(epoch, index))
                new = noise / ops.sqrt(ops.sum(ops.square(noise), axis=1, keepdims=True))
                not_orthogonal += d
            else:
                before = ops.convert_to_tensor(np.array(self._before[target.path]), dtype)
                fit = min(filters, width - d)
                constraints = ops.concatenate([kept, before], axis=0)[:fit]
                new = orthogonal_rows(constraints, d, repr_seed(epoch, index))
                not_orthogonal += d if fit < filters else 0
            std = initializer_std(_initializer(layer_of.get(id(variable)), variable),
                                  tuple(variable.shape))
            if std is None:
                std = ops.std(kept)
            new = new * ops.cast(std * math.sqrt(width), dtype)
            rows = rows * keep[:, None] + ops.matmul(ops.transpose(hot), new)
            variable.assign(ops.cast(layout.from_filter_rows(rows, variable.shape), variable.dtype))
            gamma, beta = entries.get(id(variable), (None, None))
            if gamma is not None:  # back to 1
                gamma.assign(gamma * ops.cast(keep, gamma.dtype) + ops.cast(1 - keep, gamma.dtype))
            if beta is not None:  # back to 0
                beta.assign(beta * ops.cast(keep, beta.dtype))
            count += d
        self._dropped, self._before, self._held = {}, {}, None
        return {**self.idle_logs(), "repr_reinitialized_filters": count,
                "repr_reinit_not_orthogonal": not_orthogonal, "repr_skipped_nonfinite": skipped}

    # ------------------------------------------------------------ helpers

    def _ranked(self):
        """The conv kernels RePr ranks: trainable, not the network's first
        conv kernel, not depthwise."""
        first = _first_conv_kernel(self.model)
        return [t for t in conv_kernels(self.model)
                if t.variable is not first and not isinstance(t.layout, layouts.DepthwiseKernel)]

    def _holder(self):
        """The `HeldZeros` of the dropped filters and their BatchNorm entries."""
        if self._held is None:
            entries = _batch_norm_entries(self.model)
            variables, masks = [], []
            for target in conv_kernels(self.model):
                if target.path not in self._dropped:
                    continue
                variable, layout = target.variable, target.layout
                shape = tuple(variable.shape)
                filters = layout.items(shape)
                hot = ops.one_hot(ops.convert_to_tensor(self._dropped[target.path], "int32"), filters)
                keep = 1 - ops.sum(hot, axis=0)
                rows = ops.broadcast_to(keep[:, None], (filters, math.prod(shape) // filters))
                variables.append(variable)
                masks.append(layout.from_filter_rows(rows, shape))
                for entry in entries.get(id(variable), ()):
                    if entry is not None:
                        variables.append(entry)
                        masks.append(keep)
            self._held = HeldZeros(variables, masks)
        return self._held


def _first_conv_kernel(model):
    """The network's first conv kernel in traversal order, trainable or not."""
    for layer in walk_layers(model):
        evolvable = evolvable_of(layer)
        if evolvable is None or not layer.built:
            continue
        for variable, layout in evolvable(layer):
            if variable is not None and layout.is_kernel:
                return variable
    return None


def _layers_of_variables(model):
    """`{id(variable): layer}` for the registered variables of `model`."""
    found = {}
    for layer in walk_layers(model):
        evolvable = evolvable_of(layer)
        if evolvable is not None and layer.built:
            for variable, _ in evolvable(layer):
                if variable is not None:
                    found[id(variable)] = layer
    return found


def _batch_norm_entries(model, layer_of=None):
    """`{id(kernel): (gamma, beta)}`: the trainable gamma and beta (None
    where absent or frozen) of the BatchNorm after each kernel's layer."""
    layer_of = _layers_of_variables(model) if layer_of is None else layer_of
    norms = batch_norm_after(model)
    trainable = {id(v) for v in model.trainable_variables}
    found = {}
    for key, layer in layer_of.items():
        norm = norms.get(layer)
        if norm is not None:
            gamma = norm.gamma if norm.scale else None
            beta = norm.beta if norm.center else None
            found[key] = tuple(v if v is not None and id(v) in trainable else None
                               for v in (gamma, beta))
    return found


def _initializer(layer, variable):
    """The initializer `layer` drew `variable` with, or None."""
    if layer is None:
        return None
    if variable is getattr(layer, "pointwise_kernel", None):
        return getattr(layer, "pointwise_initializer", None)
    return getattr(layer, "kernel_initializer", None)
