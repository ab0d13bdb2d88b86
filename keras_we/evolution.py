"""One Weight Evolution step over a whole Keras model.

`evolve(model, epoch, state)` finds the model's conv kernels and BatchNorm
vectors, runs the four strategies of `keras_we.strategies` on them in one
compiled function, and writes the results back into the variables. The
`WeightEvolution` callback calls it after each epoch; custom training loops
call it directly.
"""

import dataclasses
import functools
import math
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_we import strategies
from keras_we.backend_utils import compile_function, read_value
from keras_we.schedule import PaperSchedule, selection_ratio
from keras_we.validation import check_choice, check_int, check_real

GROUPS = ("conv", "gamma", "beta")

CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
SEPARABLE_LAYERS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


# ---------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class EvolutionOptions:
    """The hyperparameters of one evolution step (see `WeightEvolution`)."""

    conv_ratio: float = 0.2
    gamma_ratio: float = 0.05
    beta_ratio: float = 0.05
    local_ratio: float = 0.1
    force_divisor: float = 2.0
    schedule: object = None
    crossover: str = "reference"

    def __post_init__(self):
        for name in ("conv_ratio", "gamma_ratio", "beta_ratio", "local_ratio"):
            value = check_real(name, getattr(self, name), minimum=0, maximum=1)
            object.__setattr__(self, name, value)
        divisor = check_real("force_divisor", self.force_divisor, minimum=0, open_minimum=True)
        object.__setattr__(self, "force_divisor", divisor)
        if self.schedule is None:
            object.__setattr__(self, "schedule", PaperSchedule())
        elif not callable(self.schedule):
            raise TypeError(
                "`schedule` must be None (the paper's CIFAR schedule) or a "
                f"callable epoch -> multiplier; got {self.schedule!r}."
            )
        check_choice("crossover", self.crossover, strategies.CROSSOVER_MODES)

    def ratios(self, epoch):
        """The selection ratios `r(e)` of conv, gamma and beta at `epoch`."""
        return {
            group: selection_ratio(self.schedule, getattr(self, f"{group}_ratio"), epoch)
            for group in GROUPS
        }


def initial_state():
    """The starvation counters before the first evolution."""
    return {f"{group}_counter": 0 for group in GROUPS}


def check_state(state):
    """Returns a clean copy of a state dict, or raises naming what is wrong."""
    if state is None:
        return initial_state()
    if not isinstance(state, dict):
        raise TypeError(f"`state` must be a dict as returned by get_state(); got {state!r}.")
    expected = set(initial_state())
    if set(state) != expected:
        raise ValueError(
            f"`state` must have exactly the keys {sorted(expected)}; got {sorted(state)}."
        )
    return {key: check_int(f"state[{key!r}]", value, minimum=0) for key, value in state.items()}


# ---------------------------------------------------------------- report


@dataclasses.dataclass
class EvolutionReport:
    """What one evolution step did.

    Attributes:
        epoch: the 0-based epoch the step followed.
        conv_ratio, gamma_ratio, beta_ratio: the selection ratios `r(e)` used.
        conv_evolved, gamma_evolved, beta_evolved: filters / entries rewritten
            (inferior items that got a dominant partner).
        changed_elements: values that changed, all tensors together.
        skipped: paths of variables left alone because they held NaN or inf.
        evolved: False when no step ran at this epoch (`frequency`,
            `start_epoch` or the last epoch); the numbers are then 0.
    """

    epoch: int
    conv_ratio: float = 0.0
    gamma_ratio: float = 0.0
    beta_ratio: float = 0.0
    conv_evolved: int = 0
    gamma_evolved: int = 0
    beta_evolved: int = 0
    changed_elements: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    evolved: bool = True

    def to_logs(self):
        """Figures for Keras `logs`, so History and CSVLogger record them."""
        logs = {f"we_{group}_evolved": getattr(self, f"{group}_evolved") for group in GROUPS}
        logs.update({f"we_{group}_ratio": getattr(self, f"{group}_ratio") for group in GROUPS})
        logs["we_changed_elements"] = self.changed_elements
        logs["we_skipped_nonfinite"] = len(self.skipped)
        return logs

    def summary(self):
        """One line for `verbose=1`."""
        line = (
            f"Weight Evolution after epoch {self.epoch + 1}: evolved "
            f"{self.conv_evolved} filters, {self.gamma_evolved} gamma and "
            f"{self.beta_evolved} beta entries ({self.changed_elements} values); "
            f"ratios conv {self.conv_ratio:.4g}, gamma {self.gamma_ratio:.4g}, "
            f"beta {self.beta_ratio:.4g}"
        )
        if self.skipped:
            line += f"; skipped non-finite: {', '.join(self.skipped)}"
        return line


# ---------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One variable Weight Evolution rewrites."""

    variable: object
    group: str  # "conv", "gamma" or "beta"
    depthwise: bool = False

    @property
    def path(self):
        return self.variable.path


def find_targets(model):
    """Conv kernels and BatchNorm vectors of `model`, in traversal order.

    Layers are visited depth-first in the order they were tracked, nested
    models and layers included. Raises `ValueError` for an unbuilt layer.
    """
    targets = []
    for layer in [model, *_walk(model)]:
        if isinstance(layer, CONV_LAYERS):
            # A LoRA-enabled layer's `kernel` is a computed tensor; the
            # variable behind it is `_kernel`.
            kernel = getattr(layer, "_kernel", None)
            targets.append(Target(_built(layer, kernel), "conv"))
        elif isinstance(layer, DEPTHWISE_LAYERS):
            targets.append(Target(_built(layer, getattr(layer, "kernel", None)), "conv", True))
        elif isinstance(layer, SEPARABLE_LAYERS):
            depthwise = _built(layer, getattr(layer, "depthwise_kernel", None))
            pointwise = _built(layer, getattr(layer, "pointwise_kernel", None))
            targets += [Target(depthwise, "conv", True), Target(pointwise, "conv")]
        elif isinstance(layer, keras.layers.BatchNormalization):
            _built(layer, layer if layer.built else None)
            if layer.scale:
                targets.append(Target(layer.gamma, "gamma"))
            if layer.center:
                targets.append(Target(layer.beta, "beta"))
    return targets


def _walk(layer, seen=None):
    seen = set() if seen is None else seen
    for sublayer in layer._layers:
        if id(sublayer) in seen:
            continue
        seen.add(id(sublayer))
        yield sublayer
        yield from _walk(sublayer, seen)


def _built(layer, variable):
    if variable is None or not layer.built:
        raise ValueError(
            f"Layer {layer.name!r} is not built, so Weight Evolution cannot "
            "read its weights. Build the model first (call it on data, "
            "`model.build(input_shape)`, or give it an `Input`)."
        )
    return variable


# ---------------------------------------------------------------- evolver


class Evolver:
    """Runs evolution steps on one model, reusing its compiled pieces."""

    def __init__(self, model, options):
        if not model.built:
            raise ValueError(
                f"Model {model.name!r} is not built, so Weight Evolution cannot "
                "find its weights. Build it before training (call it on a "
                "batch, `model.build(input_shape)`, or start it with an `Input`)."
            )
        self.model = model
        self.options = options
        self.targets = find_targets(model)
        self.kernel_count = sum(t.group == "conv" for t in self.targets)
        # The counter limit `K / force_divisor` is compared with an integer
        # counter, so its ceiling is the same test without float rounding.
        self.starvation_limit = math.ceil(self.kernel_count / options.force_divisor)
        if not self.kernel_count:
            warnings.warn(
                f"Model {model.name!r} has no conv kernels (Conv1D/2D/3D, "
                "DepthwiseConv, SeparableConv), so Weight Evolution changes "
                "nothing. Training goes on unchanged.",
                UserWarning,
                stacklevel=3,
            )

    def __call__(self, epoch, state):
        """Evolves the model after `epoch`; returns `(report, new_state)`."""
        state = check_state(state)
        ratios = self.options.ratios(epoch)
        report = EvolutionReport(epoch, **{f"{g}_ratio": r for g, r in ratios.items()})
        if not self.kernel_count:
            return report, state

        new_state = dict(state)
        for group in GROUPS:
            targets = [t for t in self.targets if t.group == group]
            if not targets:
                continue
            new_values, counter, evolved, changed, skipped = evolve_group(
                [read_value(t.variable) for t in targets],
                [_crossover_name(t, self.options.crossover) for t in targets],
                ratios[group],
                state[f"{group}_counter"],
                self.options.local_ratio,
                self.starvation_limit,
                depthwise=[t.depthwise for t in targets],
            )
            for target, value in zip(targets, new_values):
                if value is not None:
                    target.variable.assign(value)
            new_state[f"{group}_counter"] = counter
            setattr(report, f"{group}_evolved", evolved)
            report.changed_elements += changed
            report.skipped += [targets[i].path for i in skipped]
        if report.skipped:
            warnings.warn(
                "Weight Evolution skipped variables holding NaN or inf: "
                f"{', '.join(report.skipped)}. They are left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
        return report, new_state


def evolve_group(items, crossovers, ratio, counter, local_ratio, starvation_limit, depthwise=None):
    """The four strategies over one group: all conv kernels, gammas or betas.

    The scalar bookkeeping (threshold position, starvation counter) runs on
    the host. The tensor work runs in compiled functions over *buckets*:
    layers of the same layout, filter shape and crossover, concatenated
    along the filter axis, so that a model costs a few calls, not a few per
    layer. Buckets are capped in size to bound the memory a step needs.

    Args:
        items: one tensor per layer, in traversal order: conv kernels in
            Keras layout, or BatchNorm vectors.
        crossovers: for each item, a name from `CROSSOVERS`.
        ratio: the selection ratio `r(e)` of this group.
        counter: the starvation counter before the first layer.
        local_ratio: local selection fraction of a layer's best score.
        starvation_limit: the integer ceiling of `K / force_divisor`.
        depthwise: for each item, whether it is a depthwise kernel.

    Returns:
        `(new_items, counter, evolved, changed, skipped)`: the new tensors
        (None where nothing changed), the counter after the last layer, the
        number of inferior items rewritten, the number of values changed and
        the indices of items skipped for holding NaN or inf.
    """
    depthwise = depthwise or [False] * len(items)
    layouts = [
        "entry" if name == "entry" else "depthwise" if dw else "conv"
        for name, dw in zip(crossovers, depthwise)
    ]
    item_sizes = [_item_count(item, layout) for item, layout in zip(items, layouts)]
    buckets = _buckets(items, layouts, crossovers)
    members = [i for bucket in buckets for i in bucket]  # concatenation order
    sizes = [item_sizes[i] for i in members]

    # Scores (NaN/inf tensors score +inf, last in every sort) and finiteness.
    scored = [
        _compiled(_bucket_scores)([items[i] for i in bucket], layouts[bucket[0]])
        for bucket in buckets
    ]
    finite = np.concatenate([ops.convert_to_numpy(flags) for _, flags in scored])
    finite = dict(zip(members, finite.tolist()))
    scores = ops.concatenate([bucket_scores for bucket_scores, _ in scored])

    # Global and local selection, all layers' counts in one transfer.
    finite_count = sum(n for i, n in zip(members, sizes) if finite[i])
    position = strategies.threshold_position(finite_count, ratio) if finite_count else 0
    layer_ids = np.repeat(np.arange(len(members), dtype="int32"), sizes)
    important, weak = _compiled(_selection)(
        scores,
        ops.convert_to_tensor(position, "int32"),
        local_ratio,
        ops.convert_to_tensor(layer_ids),
        len(members),
    )
    counts = dict(zip(members, zip(ops.convert_to_numpy(important).tolist(),
                                   ops.convert_to_numpy(weak).tolist())))

    # The starvation counter runs through the layers in traversal order.
    inferior = {}
    for i, size in enumerate(item_sizes):
        if finite[i]:
            inferior[i], counter = strategies.inferior_count(size, *counts[i], counter, starvation_limit)

    # Forward matching and crossover, one call per bucket that evolves.
    new_items, evolved, changed = [None] * len(items), 0, []
    pairs = {i: min(k, item_sizes[i] - k) for i, k in inferior.items()}
    for bucket in buckets:
        if not any(pairs.get(i, 0) for i in bucket):
            continue
        results, bucket_changed = _compiled(_bucket_evolve)(
            [items[i] for i in bucket],
            ops.convert_to_tensor([inferior.get(i, 0) for i in bucket], "int32"),
            layouts[bucket[0]],
            crossovers[bucket[0]],
        )
        for i, result in zip(bucket, results):
            if pairs.get(i, 0):
                new_items[i] = result
                evolved += pairs[i]
        changed.append((bucket, bucket_changed))
    changed = sum(
        c for bucket, counts in changed
        for i, c in zip(bucket, ops.convert_to_numpy(counts).tolist()) if pairs.get(i, 0)
    )
    skipped = [i for i in range(len(items)) if not finite[i]]
    return new_items, counter, evolved, int(changed), skipped


CROSSOVERS = {
    "entry": strategies.entry_crossover,
    "filter": strategies.filter_crossover,
    "element-paper": functools.partial(strategies.element_crossover, mode="paper"),
    "element-reference": functools.partial(strategies.element_crossover, mode="reference"),
}

# Buckets hold at most this many values, or one layer if it is larger, so
# a step's extra memory stays a small multiple of the largest kernel.
BUCKET_VALUES = 2**20


def _crossover_name(target, mode):
    if target.group != "conv":
        return "entry"
    if strategies.uses_filter_crossover(target.variable.shape, mode):
        return "filter"
    return f"element-{mode}"


def _item_count(item, layout):
    shape = tuple(item.shape)
    return shape[-2] * shape[-1] if layout == "depthwise" else shape[-1]


def _buckets(items, layouts, crossovers):
    """Groups layers that can be concatenated along the filter axis."""
    open_buckets, buckets = {}, []
    for i, (item, layout, crossover) in enumerate(zip(items, layouts, crossovers)):
        shape = tuple(item.shape)
        rows = shape[:-2] if layout == "depthwise" else shape[:-1]
        key = (layout, crossover, math.prod(rows), str(item.dtype))
        if layout == "conv":
            key += (shape[-2],)
        bucket = open_buckets.get(key)
        if bucket is None or bucket[1] + math.prod(shape) > BUCKET_VALUES:
            bucket = open_buckets[key] = [[], 0]
            buckets.append(bucket[0])
        bucket[0].append(i)
        bucket[1] += math.prod(shape)
    return buckets


def _bucket_view(values, layout):
    """A bucket's layers side by side in filter layout (or one BN vector)."""
    if layout == "entry":
        views = values
    else:
        views = [strategies.filter_layout(v, depthwise=layout == "depthwise") for v in values]
    sizes = [view.shape[-1] for view in views]
    layer_ids = np.repeat(np.arange(len(views), dtype="int32"), sizes)
    return ops.concatenate(views, axis=-1), sizes, layer_ids


def _compute_dtype(values):
    # Scores accumulate in float32 at least, also for float16 variables.
    dtype = keras.backend.standardize_dtype(values.dtype)
    return "float64" if dtype == "float64" else "float32"


def _view_scores(view):
    if len(view.shape) == 1:
        return strategies.entry_scores(view)
    return strategies.filter_scores(view)


def _bucket_scores(values, layout):
    """Scores of a bucket's items, +inf for layers holding NaN or inf, and
    whether each layer is finite."""
    view, sizes, layer_ids = _bucket_view(values, layout)
    finite_items = ops.isfinite(view)
    if len(view.shape) > 1:
        finite_items = ops.all(finite_items, axis=(0, 1))
    finite = ops.segment_min(ops.cast(finite_items, "int32"), layer_ids, num_segments=len(sizes)) > 0
    scores = _view_scores(ops.cast(view, _compute_dtype(view)))
    return ops.where(ops.take(finite, layer_ids), scores, float("inf")), finite


def _selection(scores, position, local_ratio, layer_ids, layers):
    threshold = strategies.global_threshold(scores, position)
    return strategies.local_counts(scores, threshold, local_ratio, layer_ids, layers)


def _bucket_evolve(values, counts, layout, crossover):
    """Forward matching and crossover of a bucket's layers, `counts[l]`
    inferior items in layer `l`; returns the new tensors and how many
    values of each changed."""
    view, sizes, layer_ids = _bucket_view(values, layout)
    filters = ops.cast(view, _compute_dtype(view))
    partner, paired = strategies.forward_pairs(_view_scores(filters), counts, layer_ids, sizes)
    result = ops.cast(CROSSOVERS[crossover](filters, partner, paired), view.dtype)
    # A value that fits float32 may overflow a narrower variable dtype.
    result = ops.where(ops.isfinite(result), result, view)
    moved = ops.cast(result != view, "int32")
    if len(view.shape) > 1:
        moved = ops.sum(moved, axis=(0, 1))
    changed = ops.segment_sum(moved, layer_ids, num_segments=len(sizes))
    parts = ops.split(result, np.cumsum(sizes)[:-1].tolist(), axis=-1) if len(values) > 1 else [result]
    return [ops.reshape(part, value.shape) for part, value in zip(parts, values)], changed


@functools.cache
def _compiled_for(function, backend):
    return compile_function(function, static_argnums=_STATIC_ARGS.get(function, ()))


def _compiled(function):
    return _compiled_for(function, keras.backend.backend())


_STATIC_ARGS = {_bucket_scores: (1,), _selection: (4,), _bucket_evolve: (2, 3)}


# ---------------------------------------------------------------- evolve()


_EVOLVERS = weakref.WeakKeyDictionary()


def evolve(model, epoch, state=None, **options):
    """Applies one Weight Evolution step to `model`, for custom training loops.

    Call it after each epoch of training (and validation). The step is
    compiled on the first call and reused while the model and the options
    stay the same.

    Example:

    ```python
    state = None
    for epoch in range(epochs):
        train_one_epoch(model)
        report, state = keras_we.evolve(model, epoch, state)
        print(report.summary())
    ```

    Args:
        model: a built `keras.Model` (or layer) holding conv kernels.
        epoch: the 0-based epoch just finished; it sets the ratios through
            the schedule.
        state: the dict returned by the previous call (the starvation
            counters carried across epochs), or None to start afresh.
        **options: `conv_ratio`, `gamma_ratio`, `beta_ratio`, `local_ratio`,
            `force_divisor`, `schedule` and `crossover`, as for
            `WeightEvolution`.

    Returns:
        `(report, state)`: an `EvolutionReport` and the new state dict.
    """
    known = {f.name for f in dataclasses.fields(EvolutionOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"evolve() got unknown options {unknown}; allowed: {sorted(known)}."
        )
    epoch = check_int("epoch", epoch, minimum=0)
    options = EvolutionOptions(**options)
    evolver = _EVOLVERS.get(model)
    if evolver is None or evolver.options != options:
        evolver = Evolver(model, options)
        _EVOLVERS[model] = evolver
    return evolver(epoch, state)
