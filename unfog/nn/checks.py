"""Range checks for the architecture configs, run before anything is built: a config file with
a field out of range gets an error naming the field, not a ZeroDivisionError, a MemoryError or
minutes of building. The bounds are far above any published model's (SDXL, SD 3, CLIP bigG)."""

from __future__ import annotations

import math

from ..errors import UnfogError


def check_ints(config, bounds: dict[str, tuple[int, int]]) -> None:
    """Each named field is an int (or, for list fields, a list of ints) within its bounds."""
    name = type(config).__name__
    for field, (lo, hi) in bounds.items():
        value = getattr(config, field)
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not 1 <= len(value) <= 8:
            raise UnfogError(f"{name}.{field} must list 1 to 8 values, got {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in values):
            raise UnfogError(f"{name}.{field} must be {'a list of integers' if isinstance(value, list) else 'an integer'} from {lo} to {hi}, got {value!r}")


def check_number(config, field: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    value = getattr(config, field)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
        raise UnfogError(f"{type(config).__name__}.{field} must be a finite number from {lo} to {hi}, got {value!r}")
