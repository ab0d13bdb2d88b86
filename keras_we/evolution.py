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

from keras_we import crossovers, steps
from keras_we.backend_utils import (
    no_grad, release_free_memory, resident_bytes, static_shapes, variable_function)
from keras_we.layers import find_targets
from keras_we.layouts import GROUPS
from keras_we.plan import Plan
from keras_we.schedule import as_schedule
from keras_we.validation import check_int, check_real


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
    crossover: object = "reference"

    def __post_init__(self):
        for name in ("conv_ratio", "gamma_ratio", "beta_ratio", "local_ratio"):
            value = check_real(name, getattr(self, name), minimum=0, maximum=1)
            object.__setattr__(self, name, value)
        divisor = check_real("force_divisor", self.force_divisor, minimum=0, open_minimum=True)
        object.__setattr__(self, "force_divisor", divisor)
        object.__setattr__(self, "schedule", as_schedule(self.schedule))
        object.__setattr__(self, "crossover", crossovers.get(self.crossover))

    def ratios(self, epoch):
        """The selection ratios `r(e)` of conv, gamma and beta at `epoch`.

        Raises `ValueError` when the schedule takes a ratio outside [0, 1]:
        a fraction of the filters cannot exceed all of them, and clipping
        would hide a schedule that does not do what its author meant.
        """
        ratios = {}
        for group in GROUPS:
            base = getattr(self, f"{group}_ratio")
            ratio = self.schedule.ratio(base, epoch)
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


# ---------------------------------------------------------------- evolver

# After a bucket, if the process has grown by more than this fraction of
# the plan's bytes since the step began, the memory freed so far goes back
# to the system before the next bucket (see `release_free_memory`). glibc
# keeps freed temporaries, so that without it each bucket's would add to the
# step's footprint; releasing after every bucket costs more time than it
# saves memory (JAX, ResNet-56: 4x the step's time).
RELEASE_FRACTION = 0.25


class Evolver:
    """Runs evolution steps on a set of targets, compiled once: the one
    driver of the step sequence (see `keras_we.steps`).

    A step over the targets' `Plan` is `measure` (compiled: norms, scores
    and the selection counts), then, on the host, the starvation counters
    and forward matching, then one crossover per bucket with paired items,
    which also writes that bucket's variables: compiled, or on eager
    PyTorch in place, paired columns only (see `static_shapes`).

    Args:
        targets: `keras_we.layers.Target`s, as `find_targets(model)` returns
            them (the model's trainable variables at the time; see
            `evolver_for`).
        options: `EvolutionOptions`.
        name: what the warning for a conv-less model calls it.
        run_eagerly: run the step op by op instead of compiled.
    """

    def __init__(self, targets, options, name="model", run_eagerly=False):
        self.options = options
        self.targets = list(targets)
        self.kernel_count = sum(t.group == "conv" for t in self.targets)
        # The counter limit `K / force_divisor` is compared with an integer
        # counter, so its ceiling is the same test without float rounding.
        self.starvation_limit = math.ceil(self.kernel_count / options.force_divisor)
        if not self.kernel_count:
            warnings.warn(
                f"Model {name!r} has no trainable conv kernels (Conv1D/2D/3D, "
                "DepthwiseConv, SeparableConv, or a registered layer), so Weight "
                "Evolution changes nothing. Training goes on unchanged.",
                UserWarning,
                stacklevel=4,
            )
            return
        self.plan = Plan(self.targets, options.crossover)
        self._step_start = 0  # resident bytes as the current step began
        variables = [self.targets[i].variable for i in self.plan.order]
        local_ratio = options.local_ratio
        # Plain tuples cross the compiled boundary: `tf.function` handles a
        # namedtuple argument or result more slowly.
        # `measure` reads every variable, so TensorFlow runs it as a graph,
        # not with XLA, which would copy them all (see `variable_function`).
        self._measure = variable_function(
            lambda values, positions: tuple(steps.measure(self.plan, values, positions, local_ratio)),
            variables, run_eagerly=run_eagerly, jit_compile=False)
        # One compiled crossover per bucket, which writes its own variables;
        # eager steps cross over in place (see `static_shapes`).
        self._variables = variables
        self._crossovers = [
            variable_function(
                lambda values, norms, matching, bucket=bucket: tuple(steps.crossover(
                    self.plan, bucket, values, norms, steps.Matching(*matching))),
                [variables[t] for t in bucket.tensors], writes=True, run_eagerly=run_eagerly)
            for bucket in self.plan.buckets
        ] if static_shapes() else None

    def _release_if_grown(self):
        """Gives the memory freed so far back to the system if the process
        has grown by more than `RELEASE_FRACTION` of the plan's bytes since
        the step began."""
        if resident_bytes() - self._step_start > RELEASE_FRACTION * self.plan.nbytes:
            release_free_memory()

    def _cross_over(self, measurement, counts, pairs):
        """Forward matching (on the host), then the crossover of each bucket
        with paired items, one after the other; returns how many values
        changed."""
        plan = self.plan
        matching = steps.match(plan, ops.convert_to_numpy(measurement.scores), counts)
        self._release_if_grown()
        in_place = self._crossovers is None
        if in_place:
            norms = ops.convert_to_numpy(measurement.norms)
        else:
            norms, matching = measurement.norms, tuple(ops.convert_to_tensor(x) for x in matching)
        changed = 0
        for b, bucket in enumerate(plan.buckets):
            members = pairs[list(bucket.tensors)] > 0
            if not members.any():
                continue
            if in_place:
                with no_grad():
                    counted = steps.crossover_in_place(
                        plan, bucket, [self._variables[t] for t in bucket.tensors], norms, matching)
            else:
                # Reading the counts also waits for the bucket's writes, so
                # that the next bucket is not computed beside this one.
                counted = ops.convert_to_numpy(self._crossovers[b](norms, matching, write=members.tolist()))
            changed += int(counted[members].sum())
            self._release_if_grown()
        return changed

    def fits(self, options, targets):
        """Whether this evolver is the one for `options` and `targets` (as
        `find_targets` returns them now)."""
        return options == self.options and (
            [id(t.variable) for t in targets] == [id(t.variable) for t in self.targets])

    def __call__(self, epoch, state):
        """Evolves the targets after `epoch`; returns `(report, new_state)`."""
        state = check_state(state)
        ratios = self.options.ratios(epoch)
        report = EvolutionReport(epoch, **{f"{g}_ratio": r for g, r in ratios.items()})
        if not self.kernel_count:
            return report, state

        self._step_start = resident_bytes()
        plan, local_ratio = self.plan, self.options.local_ratio
        group_ratios = [ratios[g] for g in plan.groups]
        measurement = steps.Measurement(
            *self._measure(ops.convert_to_tensor(plan.positions(group_ratios), "int32")))
        self._release_if_grown()
        inferior = steps.inferior_counts(
            plan, measurement, group_ratios, [state[f"{g}_counter"] for g in plan.groups],
            self.starvation_limit,
            lambda positions: steps.select(
                plan, measurement.scores, positions, local_ratio))
        new_state = dict(state, **{f"{g}_counter": c for g, c in zip(plan.groups, inferior.counters)})
        pairs = plan.pairs(inferior.counts)
        for g, tensors in zip(plan.groups, plan.group_tensors):
            setattr(report, f"{g}_evolved", int(pairs[tensors].sum()))
        report.skipped = [self.targets[plan.order[t]].path for t in inferior.skipped]
        if pairs.any():
            report.changed_elements = self._cross_over(measurement, inferior.counts, pairs)
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
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so Weight Evolution cannot "
            "find its weights. Build it before training (call it on a "
            "batch, `model.build(input_shape)`, or start it with an `Input`)."
        )
    current = _EVOLVERS.get(model)
    targets = find_targets(model)
    if current is None or not current.fits(options, targets):
        current = Evolver(targets, options, name=model.name)
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
