"""Finding: a rule's verdict on one report, as a typed value that reads back from its own JSON.

A Finding is also a read-only mapping over that JSON (``f["rule"]``, ``f.get("commands")``, ``dict(f)``),
so code that read a report's findings as dicts keeps working. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from deadneuron.errors import UsageError
from deadneuron.ops import op_from_dict
from deadneuron.rules.model import Evidence, Fix, Severity, freeze_channels


@dataclass(frozen=True)
class Finding(Mapping[str, Any]):
    """A rule's verdict on one report: what is wrong, where, the evidence, and what to try.

    ``fixes`` are the fixes that apply to the audited subject, the preferred first; ``commands[i]`` is the
    ``deadneuron patch`` command line of ``fixes[i]`` where the subject has one (a checkpoint audited
    from the command line), and empty otherwise. ``withheld`` says, per fix that does not apply to this
    subject, why it is not suggested.
    """

    rule: str
    severity: Severity
    title: str
    message: str
    sites: tuple[str, ...] = ()
    channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    evidence: tuple[Evidence, ...] = ()
    fixes: tuple[Fix, ...] = ()
    commands: tuple[str, ...] = ()
    withheld: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", freeze_channels(self.channels))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON. ``patch_ops[i]`` are the ops of ``commands[i]``; the first is the preferred fix."""
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "title": self.title,
            "message": self.message,
            "sites": list(self.sites),
            "channels": {site: list(ids) for site, ids in self.channels.items()},
            "evidence": [e.to_dict() for e in self.evidence],
            "commands": list(self.commands),
            "patch_ops": [[op.to_dict() for op in fix.ops] for fix in self.fixes],
            "withheld": list(self.withheld),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The Finding ``to_dict`` wrote (or a Finding itself); older reports' findings (``id`` for the
        rule, no evidence or ops) read with what they hold. ValueError for what is not a finding."""
        if isinstance(data, Finding):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a finding must be a mapping, got {type(data).__name__}")
        try:
            return cls(
                rule=str(data.get("rule") or data.get("id") or "?"),
                severity=Severity(str(data.get("severity", "info"))),
                title=str(data.get("title") or data.get("rule") or data.get("id") or "finding"),
                message=str(data.get("message") or ""),
                sites=tuple(str(s) for s in data.get("sites") or ()),
                channels={str(s): tuple(int(c) for c in ids) for s, ids in (data.get("channels") or {}).items()},
                evidence=tuple(_evidence(e) for e in data.get("evidence") or ()),
                fixes=tuple(Fix(tuple(op_from_dict(op) for op in ops)) for ops in data.get("patch_ops") or ()),
                commands=_texts(data.get("commands")),
                withheld=_texts(data.get("withheld")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, UsageError) as exc:
            raise ValueError(f"malformed finding {data.get('rule') or data.get('id')!r}: {type(exc).__name__}: {exc}") from exc

    # -- read-only mapping over the JSON --------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _texts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _evidence(data: Mapping[str, Any]) -> Evidence:
    observed, threshold = data.get("observed"), data.get("threshold")
    return Evidence(
        metric=str(data["metric"]),
        observed=math.nan if observed is None else float(observed),
        threshold=math.nan if threshold is None else float(threshold),
        comparison=data["comparison"],
        site=data.get("site"),
    )


__all__ = ["Finding"]
