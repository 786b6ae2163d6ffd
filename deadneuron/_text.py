"""Short lists in messages: the first few items, then how many more."""

from __future__ import annotations

from collections.abc import Sequence


def few(items: Sequence[str], limit: int = 4) -> str:
    """``a, b, c, d and 3 more``: the first ``limit`` items joined, then the count of the rest."""
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


__all__ = ["few"]
