"""Parsing of KEY=VALUE scalars shared by the CLI (--model-arg) and the rule thresholds (--config)."""

from __future__ import annotations

from typing import Any


def parse_scalar(raw: str) -> Any:
    """``"4"`` -> 4, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"none"`` -> None, anything else the string."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
