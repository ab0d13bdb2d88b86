"""Schedules: the selection ratio `r(e)` of each epoch from a base ratio."""

import math

from keras_we.validation import check_real


class Schedule:
    """How the selection ratios change over epochs.

    A schedule maps a base ratio (`conv_ratio`, `gamma_ratio`,
    `beta_ratio`) and a 0-based epoch to the ratio `r(e)` used after that
    epoch. Subclasses define `ratio` and `get_config` (the arguments that
    rebuild them, so that equal schedules compare equal and an evolver is
    reused). Calling a schedule gives its multiplier, `ratio(1.0, epoch)`.
    """

    def ratio(self, base_ratio, epoch):
        """The ratio `r(e)` at `epoch` for `base_ratio`."""
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __call__(self, epoch):
        """The multiplier of every selection ratio at `epoch`."""
        return self.ratio(1.0, epoch)

    def __eq__(self, other):
        return type(other) is type(self) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self.get_config())))

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class PaperSchedule(Schedule):
    """Multiplier of the selection ratios at each epoch, as in the paper's code.

    Training is split by `milestones` into segments; in segment `k` (the
    number of milestones at or before the epoch) the multiplier is
    `factors[k] * sigmoid((epoch - m_k) / temperature)`, where `m_k` is the
    segment's first epoch. The ratio of each selection at an epoch is
    `ratio * factors[k] * sigmoid(...)`, computed in float64.

    The sigmoid restarts at each milestone, so evolution is gentle right
    after a learning-rate drop and grows within the segment.

    Example:

    ```python
    schedule = keras_we.PaperSchedule()       # CIFAR: (60, 120), 15
    schedule(0), schedule(59), schedule(60)   # 0.5, 0.98.., 0.2
    keras_we.PaperSchedule.imagenet()         # (30, 60), (1, .5, .25), 8
    keras_we.PaperSchedule().scaled(30)       # for a 30-epoch run
    ```

    Args:
        milestones: increasing epochs (0-based) where a new segment starts.
            Defaults to `(60, 120)`.
        factors: one factor per segment, `len(milestones) + 1` non-negative
            numbers. Defaults to `(1.0, 0.4, 0.2)`.
        temperature: positive sigmoid temperature, in epochs. Defaults to 15.
        total_epochs: the run length the milestones are meant for, used by
            `scaled`. Defaults to 200, the paper's CIFAR protocol.
    """

    def __init__(
        self,
        milestones=(60, 120),
        factors=(1.0, 0.4, 0.2),
        temperature=15.0,
        total_epochs=200,
    ):
        milestones = tuple(milestones)
        factors = tuple(factors)
        for m in milestones:
            check_real("milestones", m, minimum=0)
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(
                f"`milestones` must be strictly increasing; got {milestones!r}."
            )
        if len(factors) != len(milestones) + 1:
            raise ValueError(
                "`factors` must hold one factor per segment, "
                f"len(milestones) + 1 = {len(milestones) + 1} numbers; "
                f"got {factors!r}."
            )
        for f in factors:
            check_real("factors", f, minimum=0)
        check_real("temperature", temperature, minimum=0, open_minimum=True)
        check_real("total_epochs", total_epochs, minimum=0, open_minimum=True)
        self.milestones = milestones
        self.factors = tuple(float(f) for f in factors)
        self.temperature = float(temperature)
        self.total_epochs = total_epochs

    @classmethod
    def imagenet(cls):
        """The ImageNet setting of the paper's code (90 epochs)."""
        return cls(
            milestones=(30, 60),
            factors=(1.0, 0.5, 0.25),
            temperature=8.0,
            total_epochs=90,
        )

    def scaled(self, epochs):
        """The same schedule stretched to a run of `epochs` epochs.

        Milestones and temperature scale by `epochs / total_epochs`, so a
        30-epoch CIFAR run evolves with milestones (9, 18) and temperature
        2.25.
        """
        check_real("epochs", epochs, minimum=0, open_minimum=True)
        scale = epochs / self.total_epochs
        return PaperSchedule(
            milestones=tuple(m * scale for m in self.milestones),
            factors=self.factors,
            temperature=self.temperature * scale,
            total_epochs=epochs,
        )

    def segment(self, epoch):
        """`(factor, start)` of the segment holding `epoch`."""
        k = sum(1 for m in self.milestones if m <= epoch)
        start = self.milestones[k - 1] if k else 0
        return self.factors[k], start

    def ratio(self, base_ratio, epoch):
        """`base_ratio * factors[k] * sigmoid((epoch - m_k) / temperature)`."""
        factor, start = self.segment(epoch)
        return float(base_ratio) * factor * _sigmoid((epoch - start) / self.temperature)

    def get_config(self):
        return {
            "milestones": list(self.milestones),
            "factors": list(self.factors),
            "temperature": self.temperature,
            "total_epochs": self.total_epochs,
        }


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


class MultiplierSchedule(Schedule):
    """A callable `epoch -> multiplier` as a schedule: `r(e) = base * f(e)`.

    `WeightEvolution(schedule=f)` wraps a plain callable in it. The
    multiplier must be a finite real number >= 0.

    Args:
        function: the callable `epoch -> multiplier`.
    """

    def __init__(self, function):
        if not callable(function):
            raise TypeError(f"`function` must be a callable epoch -> multiplier; got {function!r}.")
        self.function = function

    def ratio(self, base_ratio, epoch):
        multiplier = self.function(epoch)
        try:
            multiplier = float(multiplier)
        except (TypeError, ValueError):
            raise TypeError(
                f"`schedule({epoch})` must return a real number; got {multiplier!r}."
            ) from None
        if not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(
                f"`schedule({epoch})` must return a finite number >= 0; "
                f"got {multiplier!r}."
            )
        return float(base_ratio) * multiplier

    def get_config(self):
        return {"function": self.function}


def as_schedule(schedule):
    """`schedule` as a `Schedule`: None is the paper's CIFAR schedule, and a
    plain callable a `MultiplierSchedule`."""
    if schedule is None:
        return PaperSchedule()
    if isinstance(schedule, Schedule):
        return schedule
    if callable(schedule):
        return MultiplierSchedule(schedule)
    raise TypeError(
        "`schedule` must be None (the paper's CIFAR schedule), a "
        f"keras_we.Schedule or a callable epoch -> multiplier; got {schedule!r}."
    )
