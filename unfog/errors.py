"""The one exception type unfog raises for bad input, and the number checks every layer shares."""

import math
import numbers


class UnfogError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it. `field` names
    the request field at fault, where there is one (the server reports it)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def integer(v) -> int | None:
    """v as an int if it is one integer (numpy's included, not a bool), else None."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else None


def real(v) -> float | None:
    """v as a float if it is one real number (numpy's included, not a bool; NaN and infinities
    too, for the caller's range check to refuse), else None."""
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None


def finite_number(name: str, v) -> float:
    """v as a float, if it is one finite real number (numpy's included, not a bool)."""
    if real(v) is None or not math.isfinite(v):
        raise UnfogError(f"{name} must be a finite number, got {v!r}", name)
    return float(v)
