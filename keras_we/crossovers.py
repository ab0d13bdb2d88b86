"""Crossover modes: how an inferior kernel takes from its dominant partner.

A mode is one `Crossover` object, registered by name: which kernels take
whole-filter crossover (the rest take element crossover), and the formula
that gives the new value of an inferior channel's weakest element `s` from
the dominant channel's strongest `l`. `WeightEvolution(crossover=...)`
takes a registered name or a `Crossover`; BatchNorm entries always take
entry crossover. The runner offers one method `we-<name>` per registered
mode. To add a mode, register one more object (see ARCHITECTURE.md).
"""

import dataclasses
import functools
import math
from typing import Callable

from keras import ops

from keras_we import strategies
from keras_we.strategies import blend


@dataclasses.dataclass(frozen=True)
class Rule:
    """The crossover one variable's paired columns take.

    `apply(inferior, dominant, inferior_norms, dominant_norms)` takes the
    paired columns in filter layout `(S, 1, P)` (a column is one input
    channel of a filter, see `keras_we.layouts`) and the L1 norms of their
    whole filters, and returns the new inferior columns. It changes a value
    only to a finite one: where its formula gives NaN or inf, or is not
    valid, the old value stays (`steps` relies on it).

    `filterwise`: the rule treats all values of a filter alike (its
    formula depends on them only through the whole filter's norms), so a
    column may hold a whole filter instead of one channel.

    `summarize`, if given, maps columns `(S, 1, M)` to `(1, 1, M)` such
    that `apply` gives the same result with the dominant columns'
    summaries in place of the columns, so that a compiled step need not
    copy the partner columns (see `steps.crossover`).
    """

    name: str
    apply: Callable
    uses_norms: bool = False
    filterwise: bool = False
    summarize: Callable = None


ENTRY = Rule("entry", lambda inferior, dominant, *norms: strategies.entry_crossover(inferior, dominant))
WHOLE_FILTER = Rule("filter", strategies.filter_crossover, uses_norms=True, filterwise=True)


@dataclasses.dataclass(frozen=True)
class Crossover:
    """One crossover mode.

    Attributes:
        name: what `crossover=` and the runner's `we-<name>` call it.
        whole_filter: `spatial_shape -> bool`, the kernels (by the spatial
            extent of their filters, e.g. `(1, 1)`) that take whole-filter
            crossover, `J <- a*J + (1-a)*D` with `a = L1(J)/(L1(J)+L1(D))`.
        element: `(s, l) -> (value, valid)`, the new value of the weakest
            element `s` from the strongest `l`, elementwise over tensors, and
            where it is valid (elsewhere the old value stays).
        description: one line for documentation and `--help`.
    """

    name: str
    whole_filter: Callable
    element: Callable
    description: str = ""

    def rule(self, layout, shape):
        """The `Rule` a variable of `shape` held in `layout` takes."""
        if not layout.is_kernel:
            return ENTRY
        if self.whole_filter(layout.spatial_shape(shape)):
            return WHOLE_FILTER
        return self._element_rule

    @functools.cached_property
    def _element_rule(self):
        # One object per mode, so that the variables sharing it share a bucket.
        return Rule(f"element ({self.name})", lambda inferior, dominant, *norms:
                    strategies.element_crossover(inferior, dominant, self.element),
                    summarize=strategies.largest_elements)


_REGISTRY = {}


def register_crossover(crossover):
    """Makes `crossover` available by its name; returns it."""
    if not isinstance(crossover, Crossover):
        raise TypeError(f"`crossover` must be a keras_we.Crossover; got {crossover!r}.")
    if not isinstance(crossover.name, str) or not crossover.name.isidentifier():
        raise ValueError(f"A crossover's `name` must be an identifier; got {crossover.name!r}.")
    _REGISTRY[crossover.name] = crossover
    return crossover


def unregister_crossover(name):
    """Removes the mode registered as `name`."""
    _REGISTRY.pop(name, None)


def names():
    """The registered modes' names, in registration order."""
    return tuple(_REGISTRY)


def get(crossover):
    """The `Crossover` for a registered name (or the object itself)."""
    if isinstance(crossover, Crossover):
        return crossover
    if isinstance(crossover, str) and crossover in _REGISTRY:
        return _REGISTRY[crossover]
    allowed = ", ".join(repr(name) for name in _REGISTRY)
    raise ValueError(
        f"`crossover` must be one of {allowed} or a keras_we.Crossover; got {crossover!r}."
    )


def _paper_element(smallest, largest):
    # a = |s| / (|s| + |l|): the weak element moves most of the way to l.
    return blend(smallest, largest, ops.abs(smallest), ops.abs(largest))


def _reference_element(smallest, largest):
    # The public code swaps the roles of the two elements in its blend:
    # l * a + s * (1 - a), a = s / (s + l), signed: 2sl / (s + l), about 2s.
    return blend(largest, smallest, smallest, largest)


PAPER = register_crossover(Crossover(
    "paper",
    whole_filter=lambda spatial: math.prod(spatial) == 1,
    element=_paper_element,
    description="the paper's Fig. 1; whole-filter crossover for 1x1 kernels",
))
REFERENCE = register_crossover(Crossover(
    "reference",
    # The public code tests only the first spatial size, so a `1 x k`
    # kernel also takes whole-filter crossover.
    whole_filter=lambda spatial: spatial[0] == 1,
    element=_reference_element,
    description="what the public code computes, with which the paper's results were obtained",
))
