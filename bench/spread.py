"""A figure measured more than once: its median and range, and a goal's verdict over the whole range.

One side-by-side pair cannot carry a claim (a ratio moved from 0.94 to 0.54 between two runs of the same
bench), so every ratio is measured over several interleaved pairs and reported as its median with the
range of the pairs, as ``0.83 (0.71 to 0.94)`` with an en dash between the ends. A goal is *met* only when
every pair meets it, *not met* when none does, and *mixed* otherwise; a goal whose runs all gave up is
*gave up*.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

MET, NOT_MET, MIXED, GAVE_UP = "met", "not met", "mixed", "gave up"


def spread(values: Sequence[float | None], digits: int = 3) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "values"}`` of the values that were measured (None: not measured, e.g.
    a pair whose run gave up); ``values`` keeps every one in the order measured. No value: all None."""
    measured = [v for v in values if v is not None and not math.isnan(v)]
    if not measured:
        return {"median": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {
        "median": round(statistics.median(measured), digits),
        "min": round(min(measured), digits),
        "max": round(max(measured), digits),
        "n": len(measured),
        "values": [None if v is None else round(v, digits) for v in values],
    }


def verdict(figure: dict[str, Any], ok: Callable[[float], bool]) -> str:
    """Met when every value meets the goal, not met when none does, mixed otherwise; a value that was not
    measured (its run gave up) meets nothing, and when none was measured the verdict is *gave up*."""
    values = figure["values"]
    if all(v is None for v in values):
        return GAVE_UP
    passed = sum(1 for v in values if v is not None and ok(v))
    return MET if passed == len(values) else NOT_MET if passed == 0 else MIXED


def fmt(figure: dict[str, Any] | None, digits: int = 2, suffix: str = "") -> str:
    """The median, then the range between parentheses; a single value (or a range that rounds to one value)
    without the range."""
    if not figure or figure.get("median") is None:
        return "-"
    median, low, high = (f"{figure[k]:,.{digits}f}{suffix}" for k in ("median", "min", "max"))
    return median if low == high else f"{median} ({low}\u2013{high})"
