"""Parsing of KEY=VALUE scalars shared by the CLI (--model-arg) and the rule thresholds (--config), and the
one check of every count a flag gives (--batches, --seeds, --max-steps, ...)."""

from __future__ import annotations

from typing import Any

from deadneuron.errors import UsageError


def check_count(value: int | None, flag: str, *, least: int = 1) -> None:
    """``value`` (None: not given) checked to be at least ``least``; a UsageError naming ``flag`` otherwise."""
    if value is not None and value < least:
        raise UsageError(f"{flag} must be at least {least}, got {value}")


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
