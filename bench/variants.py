"""Prototype changes to the backfill package, measured by the benchmark before they are proposed.

Each variant monkeypatches :mod:`backfill` in the process that runs it (see bench.child); the proposed
diff for backfill/ is in the benchmark's report, not here.
"""

from __future__ import annotations

from collections.abc import Callable

VARIANTS: dict[str, Callable[[], None]] = {}


def apply(name: str) -> None:
    """Apply prototype ``name`` (one of VARIANTS) to the backfill package in this process."""
    try:
        VARIANTS[name]()
    except KeyError:
        raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}") from None
