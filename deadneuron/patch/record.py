"""What a patch did: the changes it made, what it could not patch, and remarks (plain values)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Change:
    """One thing a patch changed: a module, a config key or a group of weights."""

    target: str
    before: Any
    after: Any
    note: str = ""

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.target}: {show(self.before)} -> {show(self.after)}{note}"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "before": _plain(self.before), "after": _plain(self.after), "note": self.note}


@dataclass(frozen=True)
class ApplyRecord:
    """What a plan changed, what it could not change, and remarks."""

    changes: tuple[Change, ...] = ()
    not_patched: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()  # the sites a config plan selected (config changes only)

    def lines(self) -> list[str]:
        out = [c.line() for c in self.changes]
        out += [f"not patched: {n}" for n in self.not_patched]
        return out + [f"note: {n}" for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        out = {"changes": [c.to_dict() for c in self.changes], "not_patched": list(self.not_patched),
               "notes": list(self.notes)}  # fmt: skip
        return {**out, "targets": list(self.targets)} if self.targets else out


@dataclass
class RecordBuilder:
    """Collects a record while a plan is applied."""

    changes: list[Change] = field(default_factory=list)
    not_patched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)  # "module:NAME" / "function:OWNER.FN" selectors
    dropped: list[str] = field(default_factory=list)  # "module:NAME" selectors of inserted dropout
    normed: list[str] = field(default_factory=list)  # "layer:NAME" selectors of layers given a BatchNorm

    def record(self) -> ApplyRecord:
        return ApplyRecord(tuple(self.changes), tuple(dict.fromkeys(self.not_patched)), tuple(dict.fromkeys(self.notes)))


def show(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


__all__ = ["ApplyRecord", "Change", "RecordBuilder"]
