"""Checks for method options that every family shares: real booleans, counts and finite numbers, with messages
that name the option, the value given and what is allowed (a MethodError, never a raw ValueError)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from medlens.errors import MethodError


def flag(options: Mapping[str, Any], name: str) -> bool:
    """A boolean option; strings such as "false" are refused (they would read as True)."""
    value = options.get(name, False)
    if type(value).__name__ == "bool_":  # numpy's bool
        value = bool(value)
    if not isinstance(value, bool):
        raise MethodError(f"option {name} must be True or False, got {value!r}.")
    return value


def positive_int(options: Mapping[str, Any], name: str, minimum: int = 1) -> int:
    """A count option (a batch size, a number of samples): an int (not a bool), at least `minimum`."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise MethodError(f"option {name} must be {allowed}, got {value!r}.")
    return int(value)


def finite_number(value: Any, name: str, *, minimum: Optional[float] = None, above: Optional[float] = None) -> float:
    """`value` as a finite float, at least `minimum` or strictly above `above` when given; `name` is for the message."""
    try:
        if isinstance(value, (bool, str)) or value is None:
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise MethodError(f"option {name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise MethodError(f"option {name} must be a finite number, got {value!r}.")
    if minimum is not None and number < minimum:
        raise MethodError(f"option {name} must be at least {minimum:g}, got {value!r}.")
    if above is not None and number <= above:
        raise MethodError(f"option {name} must be above {above:g}, got {value!r}.")
    return number


def finite_float(options: Mapping[str, Any], name: str, *, minimum: Optional[float] = None,
                 above: Optional[float] = None) -> float:
    """The option `name` as a finite float (see `finite_number`)."""
    return finite_number(options.get(name), name, minimum=minimum, above=above)
