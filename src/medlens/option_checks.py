"""Checks for method options that every family shares: real booleans and finite numbers, with messages that
name the option, the value given and what is allowed (a MethodError, never a raw ValueError)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from .errors import MethodError


def flag(options: Mapping[str, Any], name: str) -> bool:
    """A boolean option; strings such as "false" are refused (they would read as True)."""
    value = options.get(name, False)
    if type(value).__name__ == "bool_":  # numpy's bool
        value = bool(value)
    if not isinstance(value, bool):
        raise MethodError(f"option {name} must be True or False, got {value!r}.")
    return value


def finite_float(options: Mapping[str, Any], name: str, *, minimum: Optional[float] = None,
                 above: Optional[float] = None) -> float:
    """A finite number option, at least `minimum` or strictly above `above` when given."""
    value = options.get(name)
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
