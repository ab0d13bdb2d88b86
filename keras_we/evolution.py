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
from keras_we.backend_utils import segment_min, segment_sum, true_indices, variable_function
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
        """The selection ratios `r(e)` of conv, gamma and beta at `epoch`.

        Raises `ValueError` when the schedule takes a ratio outside [0, 1]:
        a fraction of the filters cannot exceed all of them, and clipping
        would hide a schedule that does not do what its author meant.
        """
        ratios = {}
        for group in GROUPS:
            base = getattr(self, f"{group}_ratio")
            ratio = selection_ratio(self.schedule, base, epoch)
            if not 0 <= ratio <= 1:
                raise ValueError(
                    f"`schedule` gives {group}_ratio * schedule({epoch}) = {base!r} * "
                    f"{self.schedule(epoch)!r} = {ratio!r} at epoch {epoch}; the "
                    "selection ratios must lie in [0, 1] at every epoch."
                )
            ratios[group] = ratio
        return ratios


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
    """The trainable conv kernels and BatchNorm vectors of `model`, in
    traversal order.

    Layers are visited depth-first in the order they were tracked, nested
    models and layers included. Variables that do not train (a layer or
    model set `trainable = False`, a LoRA layer's frozen base kernel, a
    variable made with `trainable=False`) are left out: they are neither
    ranked nor rewritten. Raises `ValueError` for an unbuilt layer.
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
    trainable = {id(variable) for variable in model.trainable_variables}
    return [target for target in targets if id(target.variable) in trainable]


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


# ---------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Tensors of a `Plan` laid side by side as *columns*.

    A conv kernel `(*spatial, C, O)` reshapes, row-major, to `(S, C * O)`:
    column `c * O + o` holds the `S` spatial values of input channel `c` of
    filter `o` (for a depthwise kernel, column `o` is filter `o`). A
    column's partner column sits at the same offset as its filter's partner
    filter, so kernels with the same `S` and any channel count concatenate
    into one `(S, M)` tensor. BatchNorm vectors, gammas and betas alike,
    concatenate to `(1, M)`.
    """

    members: tuple  # indices into the plan's items
    path: str  # "entry", "filter", "element-paper" or "element-reference"
    spatial: int  # S (1 for BatchNorm vectors)
    dtype: str  # the members' variable dtype
    widths: tuple  # columns of each member
    column_filters: object  # plan-wide filter index of each column
    column_members: object  # index into `members` of each column

    def columns(self, items, dtype):
        """The members' values as one `(S, M)` tensor, cast to `dtype`."""
        if self.path == "entry":
            columns = ops.expand_dims(_concatenate([items[i] for i in self.members], 0), 0)
        else:
            views = [ops.reshape(items[i], (self.spatial, -1)) for i in self.members]
            columns = _concatenate(views, 1)
        return columns if dtype == self.dtype else ops.cast(columns, dtype)

    def split(self, columns, shapes=None, flat=False):
        """The inverse of `columns`: one tensor per member, in its shape.
        With `flat`, `columns` holds one value per column, and so do the
        parts."""
        if self.path == "entry" and not flat:
            columns = ops.squeeze(columns, 0)
        ends = np.cumsum(self.widths).tolist()
        # Slices, which cost less dispatch than `ops.split` on PyTorch.
        parts = [columns[..., start:end] for start, end in zip([0, *ends[:-1]], ends)]
        if self.path == "entry" or flat:
            return parts
        return [ops.reshape(part, shapes[i]) for part, i in zip(parts, self.members)]

    def crossover(self, inferior, dominant, inferior_norms, dominant_norms):
        """The crossover of paired columns `(S, P)`; returns the new inferior ones."""
        if self.path == "entry":
            return strategies.entry_crossover(inferior, dominant)
        # The strategies take filters in filter layout: columns as (S, 1, P).
        inferior, dominant = ops.expand_dims(inferior, 1), ops.expand_dims(dominant, 1)
        if self.path == "filter":
            new = strategies.filter_crossover(inferior, dominant, inferior_norms, dominant_norms)
        else:
            mode = self.path.removeprefix("element-")
            new = strategies.element_crossover(inferior, dominant, mode=mode)
        return ops.squeeze(new, 1)


def _concatenate(tensors, axis):
    return ops.concatenate(tensors, axis=axis) if len(tensors) > 1 else tensors[0]


class Plan:
    """How the four strategies run over a model's tensors: its conv kernels,
    gammas and betas, each group in traversal order, one group after another.

    Built once from the tensors' shapes. Its tensor methods (`measure`,
    `select`, `crossover`) are pure functions of the values, so that a
    whole model's step compiles into two calls; `inferior` is the scalar
    bookkeeping in between, on the host. The groups share every tensor
    operation but global selection, which ranks each group on its own. The
    index arrays are backend tensors, made once.

    Args:
        shapes, dtypes: of each item (a Keras conv kernel or BN vector).
        crossovers: for each item, its crossover path: "entry",
            "filter", "element-paper" or "element-reference".
        depthwise: for each item, whether it is a depthwise kernel.
        groups: for each item, its group, `0, 1, ...` in non-decreasing
            order; by default all items form one group.
    """

    def __init__(self, shapes, dtypes, crossovers, depthwise=None, groups=None):
        self.shapes = [tuple(shape) for shape in shapes]
        depthwise = depthwise or [False] * len(shapes)
        self.layouts = [
            "entry" if name == "entry" else "depthwise" if dw else "conv"
            for name, dw in zip(crossovers, depthwise)
        ]
        self.sizes = [_item_count(s, layout) for s, layout in zip(self.shapes, self.layouts)]
        self.count = sum(self.sizes)
        self.layer_ids = ops.convert_to_tensor(
            np.repeat(np.arange(len(shapes), dtype="int32"), self.sizes))
        groups = np.asarray(groups if groups is not None else [0] * len(shapes), "int32")
        # Per group: its layers, and the slice of items it holds.
        self.group_layers = [np.flatnonzero(groups == g) for g in range(groups.max(initial=0) + 1)]
        ends = np.cumsum([sum(self.sizes[i] for i in layers) for layers in self.group_layers])
        self.group_slices = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.item_groups = ops.convert_to_tensor(np.repeat(groups, self.sizes))
        self.dtypes = [keras.backend.standardize_dtype(d) for d in dtypes]
        # Scores accumulate in float32 at least, also for float16 variables.
        self.compute_dtype = "float64" if "float64" in self.dtypes else "float32"
        channels = [s[-2] if layout == "conv" else 1 for s, layout in zip(self.shapes, self.layouts)]
        self.channels = ops.convert_to_tensor(np.repeat(channels, self.sizes), self.compute_dtype)
        self.filter_ids = ops.convert_to_tensor(np.arange(self.count, dtype="int32"))
        self.buckets = self._buckets(crossovers)
        self.column_filters = ops.concatenate([b.column_filters for b in self.buckets])
        self.bucket_members = ops.convert_to_tensor(
            np.concatenate([b.members for b in self.buckets]).astype("int32"))

    def _buckets(self, crossovers):
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype("int32")
        keyed = {}
        for i, (shape, layout) in enumerate(zip(self.shapes, self.layouts)):
            spatial = 1 if layout == "entry" else math.prod(shape[:-2])
            keyed.setdefault((crossovers[i], spatial, self.dtypes[i]), []).append(i)
        buckets = []
        for (crossover, spatial, dtype), members in keyed.items():
            widths, filters = [], []
            for i in members:
                shape = self.shapes[i]
                width = math.prod(shape) // spatial
                # Column j of a regular kernel belongs to filter j % O.
                per_row = shape[-1] if self.layouts[i] == "conv" else width
                widths.append(width)
                filters.append(starts[i] + np.arange(width, dtype="int32") % per_row)
            buckets.append(Bucket(
                tuple(members), crossover, spatial, dtype, tuple(widths),
                ops.convert_to_tensor(np.concatenate(filters)),
                ops.convert_to_tensor(np.repeat(np.arange(len(members), dtype="int32"), widths)),
            ))
        return buckets

    def positions(self, ratios, finite=None):
        """Each group's global threshold position among the items of its
        finite layers (all layers when `finite` is None)."""
        positions = []
        for layers, ratio in zip(self.group_layers, ratios):
            count = sum(self.sizes[i] for i in layers if finite is None or finite[i])
            positions.append(strategies.threshold_position(count, ratio) if count else 0)
        return positions

    # ------------------------------------------------------ tensor functions

    def measure(self, items, positions, local_ratio):
        """The columns (see `Bucket`) and norms, and for each layer
        whether it is finite and its globally important and locally weak
        counts, stacked as `(3, layers)` ints.

        Norms are filters' L1 norms (BN entries' magnitudes), the sum of
        their columns'. A layer is finite when its norms are, that is when
        it holds no NaN or inf (and no values so large that a norm
        overflows). `positions` (one per group) assume every layer finite;
        see `inferior`.
        """
        columns = [bucket.columns(items, self.compute_dtype) for bucket in self.buckets]
        norms = self._norms([ops.sum(ops.abs(c), axis=0) for c in columns])
        finite = segment_min(
            ops.cast(ops.isfinite(norms), "int32"), self.layer_ids, len(self.sizes))
        facts = ops.stack([finite, *self.select(norms, finite, positions, local_ratio)])
        return columns, norms, facts

    def _norms(self, sums):
        """Filters' L1 norms, from each bucket's column sums: a filter's
        norm is the sum of its columns'.

        Eager PyTorch, where every op costs dispatch time, adds all columns
        into their filters at once. Compiled backends sum each kernel's
        `(C, O)` column sums over `C` instead, since XLA's scatter over
        millions of columns is slow.
        """
        if keras.backend.backend() == "torch":
            return segment_sum(ops.concatenate(sums), self.column_filters, self.count)
        norms = [None] * len(self.shapes)
        for bucket, bucket_sums in zip(self.buckets, sums):
            for i, part in zip(bucket.members, bucket.split(bucket_sums, flat=True)):
                if self.layouts[i] == "conv":
                    part = ops.sum(ops.reshape(part, (self.shapes[i][-2], -1)), axis=0)
                norms[i] = part
        return _concatenate(norms, 0)

    def scores(self, norms, finite):
        """Filter scores (L1 norm / input channels), +inf in skipped layers."""
        return ops.where(ops.take(finite, self.layer_ids), norms / self.channels, float("inf"))

    def select(self, norms, finite, positions, local_ratio):
        """Global selection in each group, then local selection in each
        layer: important and weak counts per layer."""
        scores = self.scores(norms, finite > 0)
        thresholds = [
            strategies.global_threshold(scores[start:end], positions[g])
            for g, (start, end) in enumerate(self.group_slices)
        ]
        threshold = thresholds[0]
        if len(thresholds) > 1:
            threshold = ops.take(ops.stack(thresholds), self.item_groups)
        return strategies.local_counts(
            scores, threshold, local_ratio, self.layer_ids, len(self.sizes))

    def crossover(self, columns, norms, facts, counts):
        """Forward matching and crossover with `counts[l]` inferior items in
        layer `l`, on `measure`'s columns. Returns the new tensors, one per
        item (unchanged where nothing evolves), and how many values of each
        changed.

        Only the columns of paired filters are gathered, crossed over and
        scattered back.
        """
        partner, paired = strategies.forward_pairs(
            self.scores(norms, facts[0] > 0), counts, self.layer_ids, self.sizes)
        shift = partner - self.filter_ids
        new_items, changed = [None] * len(self.shapes), []
        for bucket, bucket_columns in zip(self.buckets, columns):
            new, bucket_changed = self._bucket_crossover(bucket, bucket_columns, norms, paired, shift)
            changed.append(bucket_changed)
            for i, value in zip(bucket.members, bucket.split(new, self.shapes)):
                new_items[i] = value
        changed = segment_sum(ops.concatenate(changed), self.bucket_members, len(self.shapes))
        return new_items, changed

    def _bucket_crossover(self, bucket, columns, norms, paired, shift):
        """Crossover of a bucket's paired columns: the new columns, and how
        many values of each member changed."""
        paired_columns = ops.take(paired, bucket.column_filters)
        index = true_indices(paired_columns)  # None: all columns
        if bucket.dtype != self.compute_dtype:
            columns = ops.cast(columns, bucket.dtype)
        if index is not None and index.shape[0] == 0:  # no pair (known when eager)
            return columns, ops.zeros(len(bucket.members), "int32")

        def gather(x, positions=index):
            return x if positions is None else ops.take(x, positions, axis=-1)

        filters = gather(bucket.column_filters)
        offset = ops.take(shift, filters)  # to the partner filter, and column
        partners = gather(ops.arange(columns.shape[1], dtype="int32")) + offset
        inferior = gather(columns)
        dominant = ops.take(columns, partners, axis=1)
        pair_norms = (None, None)
        if bucket.path == "filter":
            pair_norms = ops.take(norms, filters), ops.take(norms, filters + offset)
        new = bucket.crossover(
            ops.cast(inferior, self.compute_dtype), ops.cast(dominant, self.compute_dtype),
            *pair_norms)
        new = ops.cast(new, bucket.dtype)
        # Keep the old value in unpaired columns and where a result is not
        # finite (a value that fits float32 may overflow a narrower dtype).
        keep = ops.logical_not(ops.logical_and(ops.isfinite(new), gather(paired_columns)))
        new = ops.where(keep, inferior, new)
        moved = ops.sum(ops.cast(new != inferior, "int32"), axis=0)
        changed = segment_sum(moved, gather(bucket.column_members), len(bucket.members))
        if index is None:
            return new, changed
        # Scatter the new columns back, as rows of the transpose.
        rows = ops.scatter_update(ops.transpose(columns), ops.expand_dims(index, 1), ops.transpose(new))
        return ops.transpose(rows), changed

    # ---------------------------------------------------------------- host

    def inferior(self, facts, ratios, counters, starvation_limit, reselect):
        """The starvation counters through the layers: inferior counts.

        `facts` is `measure`'s `(3, layers)` array on the host. When some
        layer is not finite, the threshold positions (which assumed all
        finite) are recomputed without it and `reselect(positions)` gives
        the counts.

        Returns `(counts, counters, skipped)`: inferior items per layer, each
        group's counter after its last layer, and the indices of skipped
        layers.
        """
        finite, important, weak = np.asarray(facts)
        finite = finite > 0
        if not finite.all():
            important, weak = (np.asarray(ops.convert_to_numpy(x))
                               for x in reselect(self.positions(ratios, finite)))
        counts, counters = np.zeros(len(self.sizes), "int32"), list(counters)
        for g, layers in enumerate(self.group_layers):
            for i in layers:
                if finite[i]:
                    counts[i], counters[g] = strategies.inferior_count(
                        self.sizes[i], important[i], weak[i], counters[g], starvation_limit)
        return counts, counters, np.flatnonzero(~finite).tolist()

    def pairs(self, counts):
        """Inferior items that get a partner, per layer."""
        return np.minimum(counts, np.asarray(self.sizes) - counts)


def evolve_group(items, crossovers, ratio, counter, local_ratio, starvation_limit, depthwise=None):
    """The four strategies over one group, eagerly: all conv kernels, gammas
    or betas of a model (the `Evolver` does the same, compiled, for all
    three groups at once).

    Args:
        items: one tensor per layer, in traversal order: conv kernels in
            Keras layout, or BatchNorm vectors.
        crossovers: for each item, its crossover path: "entry",
            "filter", "element-paper" or "element-reference".
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
    plan = Plan([item.shape for item in items], [item.dtype for item in items],
                crossovers, depthwise)
    positions = plan.positions([ratio])
    columns, norms, facts = plan.measure(items, positions, local_ratio)
    counts, (counter,), skipped = plan.inferior(
        ops.convert_to_numpy(facts), [ratio], [counter], starvation_limit,
        lambda positions: plan.select(norms, facts[0], positions, local_ratio))
    pairs = plan.pairs(counts)
    new_items, changed = plan.crossover(columns, norms, facts, ops.convert_to_tensor(counts))
    changed = ops.convert_to_numpy(changed)
    new_items = [new if pairs[i] else None for i, new in enumerate(new_items)]
    return new_items, counter, int(pairs.sum()), int(changed[pairs > 0].sum()), skipped


def _crossover_name(target, mode):
    if target.group != "conv":
        return "entry"
    if strategies.uses_filter_crossover(target.variable.shape, mode):
        return "filter"
    return f"element-{mode}"


def _item_count(shape, layout):
    return shape[-2] * shape[-1] if layout == "depthwise" else shape[-1]


# ---------------------------------------------------------------- evolver


class Evolver:
    """Runs evolution steps on one model, compiled once.

    A step is two compiled calls over the model's `Plan`: `measure` (norms
    and the selection counts), then, after the starvation counters run on
    the host, `crossover`, which also writes the evolved variables.

    The evolver is made for the model's trainable variables at the time;
    `fits(options, targets)` tells whether it still applies (see
    `evolver_for`).
    """

    def __init__(self, model, options, targets=None):
        if not model.built:
            raise ValueError(
                f"Model {model.name!r} is not built, so Weight Evolution cannot "
                "find its weights. Build it before training (call it on a "
                "batch, `model.build(input_shape)`, or start it with an `Input`)."
            )
        # Weakly: the evolvers cache is keyed by the model (see `evolver_for`).
        self._model = weakref.ref(model)
        self.options = options
        self.targets = find_targets(model) if targets is None else targets
        self.kernel_count = sum(t.group == "conv" for t in self.targets)
        # The counter limit `K / force_divisor` is compared with an integer
        # counter, so its ceiling is the same test without float rounding.
        self.starvation_limit = math.ceil(self.kernel_count / options.force_divisor)
        if not self.kernel_count:
            warnings.warn(
                f"Model {model.name!r} has no trainable conv kernels (Conv1D/2D/3D, "
                "DepthwiseConv, SeparableConv), so Weight Evolution changes "
                "nothing. Training goes on unchanged.",
                UserWarning,
                stacklevel=3,
            )
            return
        # The plan holds the targets group by group: conv, gamma, beta.
        self.groups = [g for g in GROUPS if any(t.group == g for t in self.targets)]
        self.order = sorted(range(len(self.targets)),
                            key=lambda i: self.groups.index(self.targets[i].group))
        targets = [self.targets[i] for i in self.order]
        self.plan = Plan(
            [t.variable.shape for t in targets],
            [t.variable.dtype for t in targets],
            [_crossover_name(t, options.crossover) for t in targets],
            [t.depthwise for t in targets],
            [self.groups.index(t.group) for t in targets],
        )
        variables = [t.variable for t in targets]
        local_ratio = options.local_ratio
        self._measure = variable_function(
            lambda values, positions: self.plan.measure(values, positions, local_ratio), variables)
        self._crossover = variable_function(self._crossover_values, variables, writes=True)

    @property
    def model(self):
        return self._model()

    def fits(self, options, targets):
        """Whether this evolver (of its model) is the one for `options` and
        `targets` (as `find_targets` returns them now)."""
        return options == self.options and (
            [id(t.variable) for t in targets] == [id(t.variable) for t in self.targets])

    def _crossover_values(self, values, columns, norms, facts, counts):
        return self.plan.crossover(columns, norms, facts, counts)

    def __call__(self, epoch, state):
        """Evolves the model after `epoch`; returns `(report, new_state)`."""
        state = check_state(state)
        ratios = self.options.ratios(epoch)
        report = EvolutionReport(epoch, **{f"{g}_ratio": r for g, r in ratios.items()})
        if not self.kernel_count:
            return report, state

        plan, group_ratios = self.plan, [ratios[g] for g in self.groups]
        positions = plan.positions(group_ratios)
        columns, norms, facts = self._measure(ops.convert_to_tensor(positions, "int32"))
        counts, counters, skipped = plan.inferior(
            ops.convert_to_numpy(facts), group_ratios,
            [state[f"{g}_counter"] for g in self.groups], self.starvation_limit,
            lambda positions: plan.select(norms, facts[0], positions, self.options.local_ratio))
        new_state = dict(state, **{f"{g}_counter": c for g, c in zip(self.groups, counters)})
        pairs = plan.pairs(counts)
        for g, layers in zip(self.groups, plan.group_layers):
            setattr(report, f"{g}_evolved", int(pairs[layers].sum()))
        report.skipped = [self.targets[self.order[i]].path for i in skipped]
        if pairs.any():
            changed = self._crossover(columns, norms, facts, ops.convert_to_tensor(counts),
                                      write=(pairs > 0).tolist())
            report.changed_elements = int(ops.convert_to_numpy(changed)[pairs > 0].sum())
        if report.skipped:
            warnings.warn(
                "Weight Evolution skipped variables holding NaN or inf: "
                f"{', '.join(report.skipped)}. They are left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
        return report, new_state


# ---------------------------------------------------------------- evolve()


_EVOLVERS = weakref.WeakKeyDictionary()


def evolver_for(model, options):
    """The `Evolver` of `model` and `options`, made once and kept while
    the model lives.

    The variables that train can change between epochs (a backbone
    unfrozen for fine-tuning), so the trainable targets are looked up at
    every step; a change (or other options) builds a new evolver, which
    compiles again. `evolve()` and every `WeightEvolution` callback share
    it, so a second `fit` of the same model does not compile again.
    """
    _check_model(model)
    current = _EVOLVERS.get(model)
    targets = find_targets(model) if model.built else None
    if current is None or targets is None or not current.fits(options, targets):
        current = Evolver(model, options, targets)
        _EVOLVERS[model] = current
    return current


def evolve(model, epoch, state=None, **options):
    """Applies one Weight Evolution step to `model`, for custom training loops.

    Call it after each epoch of training (and validation), before the next
    epoch trains; not after the last one. The step is compiled on the first
    call and reused while the model, its trainable variables and the
    options stay the same.

    Example:

    ```python
    state = None
    for epoch in range(epochs):
        if epoch > 0:  # evolve after an epoch, only if another one follows
            report, state = keras_we.evolve(model, epoch - 1, state)
            print(report.summary())
        train_one_epoch(model)
    ```

    Args:
        model: a built `keras.Model` (or layer) holding conv kernels. Only
            its trainable variables are ranked and rewritten.
        epoch: the 0-based epoch just finished; it sets the ratios through
            the schedule.
        state: the dict returned by the previous call (the starvation
            counters carried across epochs), or None to start afresh.
        **options: `conv_ratio`, `gamma_ratio`, `beta_ratio`, `local_ratio`,
            `force_divisor`, `schedule` and `crossover`, as for
            `WeightEvolution`.

    Returns:
        `(report, state)`: an `EvolutionReport` and the new state dict. A
        model without trainable conv kernels gets an empty report (and a
        warning once).
    """
    known = {f.name for f in dataclasses.fields(EvolutionOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"evolve() got unknown options {unknown}; allowed: {sorted(known)}."
        )
    _check_model(model)
    epoch = check_int("epoch", epoch, minimum=0)
    options = EvolutionOptions(**options)
    return evolver_for(model, options)(epoch, state)


def _check_model(model):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`model` must be a built keras.Model or keras.layers.Layer; got {model!r}."
        )
