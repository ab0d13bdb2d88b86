"""One Weight Evolution step over a whole Keras model.

`evolve(model, epoch, state)` finds the model's conv kernels and BatchNorm
vectors, runs the four strategies of `keras_we.strategies` on them in one
compiled function, and writes the results back into the variables. The
`WeightEvolution` callback calls it after each epoch; custom training loops
call it directly.
"""

import dataclasses
import math
import warnings
import weakref

import keras
from keras import ops

from keras_we import strategies
from keras_we.backend_utils import compile_function
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
    crossover: str = "paper"

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
    for layer in _walk(model):
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
    """Runs evolution steps on one model; compiled once, reused every epoch."""

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
        self._find_nonfinite = compile_function(_nonfinite_flags)
        self._steps = {}

    def __call__(self, epoch, state):
        """Evolves the model after `epoch`; returns `(report, new_state)`."""
        state = check_state(state)
        ratios = self.options.ratios(epoch)
        report = EvolutionReport(epoch, **{f"{g}_ratio": r for g, r in ratios.items()})
        if not self.kernel_count:
            return report, state

        variables = [t.variable for t in self.targets]
        nonfinite = ops.convert_to_numpy(self._find_nonfinite([v.value for v in variables]))
        report.skipped = [t.path for t, bad in zip(self.targets, nonfinite) if bad]
        if report.skipped:
            warnings.warn(
                "Weight Evolution skipped variables holding NaN or inf: "
                f"{', '.join(report.skipped)}. They are left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
        active = tuple(i for i, bad in enumerate(nonfinite) if not bad)
        groups = {g: [i for i in active if self.targets[i].group == g] for g in GROUPS}

        positions, counters = [], []
        for group in GROUPS:
            count = sum(self._item_count(i) for i in groups[group])
            positions.append(strategies.threshold_position(count, ratios[group]) if count else 0)
            counters.append(state[f"{group}_counter"])
        step = self._step_for(active)
        outputs = step(
            [variables[i].value for i in active],
            ops.convert_to_tensor(positions, "int32"),
            ops.convert_to_tensor(counters, "int32"),
        )
        new_values, new_counters, evolved, changed = outputs
        for i, value in zip(active, new_values):
            variables[i].assign(value)

        new_counters = ops.convert_to_numpy(new_counters).tolist()
        evolved = ops.convert_to_numpy(evolved).tolist()
        new_state = {f"{g}_counter": int(c) for g, c in zip(GROUPS, new_counters)}
        for group, count in zip(GROUPS, evolved):
            setattr(report, f"{group}_evolved", int(count))
        report.changed_elements = int(ops.convert_to_numpy(changed))
        return report, new_state

    def _item_count(self, index):
        target = self.targets[index]
        shape = target.variable.shape
        if target.group != "conv":
            return shape[0]
        return shape[-2] * shape[-1] if target.depthwise else shape[-1]

    def _step_for(self, active):
        # One compiled function per set of finite variables; normally one.
        if active not in self._steps:
            targets = [self.targets[i] for i in active]
            self._steps[active] = compile_function(self._make_step(targets))
        return self._steps[active]

    def _make_step(self, targets):
        options = self.options
        limit = self.starvation_limit

        def step(values, positions, counters):
            new_values = list(values)
            new_counters, evolved = [], []
            for g, group in enumerate(GROUPS):
                members = [i for i, t in enumerate(targets) if t.group == group]
                if not members:
                    new_counters.append(counters[g])
                    evolved.append(ops.convert_to_tensor(0, "int32"))
                    continue
                views = [_item_view(targets[i], values[i]) for i in members]
                crossovers = [_crossover_for(targets[i], options.crossover) for i in members]
                results, counter, count = evolve_group(
                    views, crossovers, positions[g], counters[g], options.local_ratio, limit
                )
                for i, result in zip(members, results):
                    new_values[i] = _from_view(result, values[i])
                new_counters.append(counter)
                evolved.append(count)
            changed = sum(
                ops.sum(ops.cast(new != old, "int32")) for new, old in zip(new_values, values)
            )
            return new_values, ops.stack(new_counters), ops.stack(evolved), changed

        return step


def evolve_group(items, crossovers, position, counter, local_ratio, starvation_limit):
    """The four strategies over one group: all conv kernels, gammas or betas.

    Args:
        items: one tensor per layer, in traversal order: filter layouts
            `(S, C, O)` for conv kernels, vectors for BatchNorm.
        crossovers: for each item, `(item, partner, paired) -> item`.
        position: index of the global threshold among the group's sorted
            scores (see `strategies.threshold_position`).
        counter: the starvation counter before the first layer.
        local_ratio: local selection fraction of a layer's best score.
        starvation_limit: the integer ceiling of `K / force_divisor`.

    Returns:
        `(new_items, counter, evolved)`: the evolved tensors, the counter
        after the last layer and the number of inferior items rewritten.
    """
    scores = [_scores(item) for item in items]
    threshold = strategies.global_threshold(ops.concatenate(scores), position)
    results, evolved = [], 0
    for item, item_scores, crossover in zip(items, scores, crossovers):
        important, weak = strategies.local_counts(item_scores, threshold, local_ratio)
        count, counter = strategies.inferior_count(
            item_scores.shape[0], important, weak, counter, starvation_limit
        )
        partner, paired = strategies.forward_pairs(item_scores, count)
        results.append(crossover(item, partner, paired))
        evolved = evolved + ops.sum(ops.cast(paired, "int32"))
    return results, counter, evolved


def _scores(item):
    if len(item.shape) == 3:
        return strategies.filter_scores(item)
    return strategies.entry_scores(item)


def _item_view(target, value):
    # Scores accumulate in float32 at least, also for float16 variables.
    if keras.backend.standardize_dtype(value.dtype) != "float64":
        value = ops.cast(value, "float32")
    if target.group == "conv":
        return strategies.filter_layout(value, target.depthwise)
    return value


def _from_view(result, old):
    result = ops.cast(ops.reshape(result, old.shape), old.dtype)
    # A value that fits float32 may overflow a narrower variable dtype.
    return ops.where(ops.isfinite(result), result, old)


def _crossover_for(target, mode):
    if target.group != "conv":
        return strategies.entry_crossover
    if strategies.uses_filter_crossover(target.variable.shape, mode):
        return strategies.filter_crossover
    return lambda filters, partner, paired: strategies.element_crossover(
        filters, partner, paired, mode
    )


def _nonfinite_flags(values):
    return ops.stack([ops.logical_not(ops.all(ops.isfinite(v))) for v in values])


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
