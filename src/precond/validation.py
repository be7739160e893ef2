"""Argument validation with the library's single error format.

Every error raised for bad input reads ``Invalid <name>: <value>. <what is allowed>.``
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

__all__ = [
    "coerce_enum",
    "invalid",
    "check_int",
    "check_float",
    "check_probability",
]

E = TypeVar("E", bound=Enum)


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """Build the standard error for an invalid argument.

    Args:
        name: The argument's name as the user typed it.
        value: The offending value.
        allowed: What is allowed, as a sentence fragment (no trailing period needed).

    Returns:
        A ``ValueError`` with the message ``Invalid <name>: <value!r>. <allowed>.``
    """
    allowed = allowed.rstrip(".")
    return ValueError(f"Invalid {name}: {value!r}. {allowed}.")


def coerce_enum(enum_cls: type[E], value: Any, name: str) -> E:
    """Turn a member or its string value into the enum member.

    Args:
        enum_cls: The enum class.
        value: A member of ``enum_cls`` or one of its values.
        name: The argument name for the error message.

    Returns:
        The enum member.

    Raises:
        ValueError: If ``value`` is neither a member nor a member's value.
    """
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if value == member.value:
            return member
    supported = tuple(m.value for m in enum_cls)
    raise invalid(name, value, f"Supported: {supported}")


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Validate an integer argument (``bool`` is rejected).

    Args:
        name: The argument name.
        value: The value to check.
        minimum: The smallest allowed value, if any.

    Returns:
        The value.

    Raises:
        ValueError: If the value is not an int or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, value, "Must be an integer")
    if minimum is not None and value < minimum:
        raise invalid(name, value, f"Must be >= {minimum}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    strict_max: bool = False,
) -> float:
    """Validate a finite real argument within optional bounds.

    Args:
        name: The argument name.
        value: The value to check.
        minimum: Lower bound, if any.
        maximum: Upper bound, if any.
        strict_min: Whether the lower bound is excluded.
        strict_max: Whether the upper bound is excluded.

    Returns:
        The value as ``float``.

    Raises:
        ValueError: If the value is not a finite real number within the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, value, "Must be a real number")
    if not math.isfinite(value):
        raise invalid(name, value, "Must be finite")
    lo_ok = minimum is None or (value > minimum if strict_min else value >= minimum)
    hi_ok = maximum is None or (value < maximum if strict_max else value <= maximum)
    if not (lo_ok and hi_ok):
        lo = "" if minimum is None else f"{'>' if strict_min else '>='} {minimum}"
        hi = "" if maximum is None else f"{'<' if strict_max else '<='} {maximum}"
        rule = " and ".join(part for part in (lo, hi) if part)
        raise invalid(name, value, f"Must be {rule}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """Validate a number in the half-open interval ``[0, 1)`` (decay rates).

    Args:
        name: The argument name.
        value: The value to check.

    Returns:
        The value as ``float``.
    """
    return check_float(name, value, minimum=0.0, maximum=1.0, strict_max=True)
