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


def device(value, name: str = "device", usable: bool = True):
    """value as a torch.device (one this torch can use, unless not `usable`), or an UnfogError naming `name`."""
    import torch

    field = name.lstrip("-")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise UnfogError(f"{name} {value!r} is not a device name (cpu, cuda, cuda:1, mps …): {e}", field) from None
    if not usable:
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnfogError(f"{name} {value}: this torch build sees no CUDA GPU (install a CUDA build of torch, or use cpu)", field)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UnfogError(f"{name} {value}: there are only {torch.cuda.device_count()} CUDA devices", field)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UnfogError(f"{name} {value}: MPS is not available on this machine", field)
    return dev


def flag(value, name: str, none: bool = False):
    """value if it is True or False (or None, where `none`), else an UnfogError naming `name`
    (a string such as "no" is truthy, and had switched the option on)."""
    if isinstance(value, bool) or (none and value is None):
        return value
    raise UnfogError(f"{name} must be True or False{' or None' if none else ''}, got {value!r}", name)
