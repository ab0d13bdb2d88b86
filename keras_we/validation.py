"""Argument checks that name the argument, the value and what is allowed."""

import math
import numbers


def check_real(name, value, minimum=None, maximum=None, open_minimum=False):
    """Returns `value` as a float after checking it is a finite real in range.

    Raises:
        TypeError: `value` is not a real number (strings and booleans are not).
        ValueError: `value` is NaN, infinite or out of range.
    """
    allowed = _describe_range(minimum, maximum, open_minimum)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {allowed}; got {value!r}.")
    value = float(value)
    too_small = minimum is not None and (
        value <= minimum if open_minimum else value < minimum
    )
    too_large = maximum is not None and value > maximum
    if not math.isfinite(value) or too_small or too_large:
        raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")
    return value


def check_int(name, value, minimum):
    """Returns `value` after checking it is an integer `>= minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def check_bool(name, value):
    """Returns `value` after checking it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return value


def check_choice(name, value, choices):
    """Returns `value` after checking it is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")
    return value


def _describe_range(minimum, maximum, open_minimum):
    if minimum is not None and maximum is not None:
        return f"a real number in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"a finite real number {'>' if open_minimum else '>='} {minimum}"
    return "a finite real number"
