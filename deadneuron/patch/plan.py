"""Patch plans (DESIGN section 6): the ops of `deadneuron.ops` to apply together, built from CLI flags or
from the rule engine's findings. Pure: values in, values out; no model, no file.

A finding's ``patch_ops`` and the flags its command names give the same plan: both are read into the ops
of `deadneuron.ops`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from deadneuron.errors import UsageError
from deadneuron.ops import (
    AddBatchNorm,
    Channels,
    HyperParameter,
    InsertDropout,
    Op,
    ReinitDead,
    SetHyperParameter,
    SwapActivation,
    hyper_parameter,
    op_from_dict,
    probability,
)
from deadneuron.replacements import replacement
from deadneuron.rules.finding import Finding
from deadneuron.select import site_selector


@dataclass(frozen=True)
class Plan:
    """An ordered tuple of ops, at most one of each kind (one per hyper-parameter)."""

    ops: tuple[Op, ...] = ()
    notes: tuple[str, ...] = ()  # what planning dropped or combined, for the user

    def __post_init__(self) -> None:
        keys = [_slot(op) for op in self.ops]
        if len(keys) != len(set(keys)):
            raise ValueError(f"a plan holds at most one op of each kind, got {keys}")

    def __bool__(self) -> bool:
        return bool(self.ops)

    def get(self, kind: type[Op]) -> Any:
        return next((op for op in self.ops if isinstance(op, kind)), None)

    def hyper_parameter(self, name: HyperParameter) -> SetHyperParameter | None:
        return next((op for op in self.ops if isinstance(op, SetHyperParameter) and op.name == name), None)

    def describe(self) -> list[str]:
        return [op.describe() + (f"  [{op.reason}]" if op.reason else "") for op in self.ops]

    def to_dict(self) -> dict[str, Any]:
        return {"ops": [op.to_dict() for op in self.ops], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(tuple(op_from_dict(d) for d in data.get("ops", ())), tuple(data.get("notes", ())))

    def overridden_by(self, other: Plan) -> Plan:
        """This plan with every op of ``other`` replacing the op of the same kind (flags beat suggestions)."""
        theirs = {_slot(op) for op in other.ops}
        kept = tuple(op for op in self.ops if _slot(op) not in theirs)
        return Plan((*kept, *other.ops), (*self.notes, *other.notes))


def _slot(op: Op) -> str:
    return f"set_hparam:{op.name}" if isinstance(op, SetHyperParameter) else type(op).__name__


def plan_from_flags(
    *,
    activation: str | None = None,
    negative_slope: float | None = None,
    sites: Sequence[str] = (),
    lr: float | None = None,
    lr_scale: float | None = None,
    dropout_between_convs: float | None = None,
    epochs: int | None = None,
    reinit_dead: bool = False,
    add_batchnorm: bool = False,
) -> Plan:
    """The plan the ``deadneuron patch`` flags ask for; UsageError for contradictory or invalid flags.

    ``sites`` (``--select``) chooses the sites of the activation swap and of the added BatchNorm."""
    if lr is not None and lr_scale is not None:
        raise UsageError("pass either --lr or --lr-scale, not both")
    if negative_slope is not None and (activation is None or replacement(activation).name != "leaky"):
        raise UsageError("--negative-slope applies to --activation leaky only")
    if negative_slope is not None and not (math.isfinite(negative_slope) and 0 <= negative_slope < 1):
        raise UsageError(f"--negative-slope must be in [0, 1), got {negative_slope}")
    if sites and activation is None and not reinit_dead and not add_batchnorm:
        raise UsageError(
            "--select chooses the sites of --activation, --reinit-dead or --add-batchnorm: add one of them"
        )
    ops: list[Op] = []
    if activation is not None:
        ops.append(SwapActivation(replacement(activation).name, negative_slope, tuple(sites), reason="flag"))
    if dropout_between_convs is not None:
        ops.append(InsertDropout(probability(dropout_between_convs), reason="flag"))
    if lr is not None or lr_scale is not None:
        ops.append(replace(hyper_parameter("learning_rate", lr, lr_scale), reason="flag"))
    if epochs is not None:
        ops.append(replace(hyper_parameter("epochs", epochs, None), reason="flag"))
    if reinit_dead:
        ops.append(ReinitDead(reason="flag", sites=tuple(sites)))
    if add_batchnorm:
        ops.append(AddBatchNorm(tuple(sites), reason="flag"))
    return Plan(tuple(ops))


def plan_from_findings(findings: Iterable[Finding | Mapping[str, Any]]) -> Plan:
    """The preferred fix (the first) of every finding, combined: most severe first, as the engine sorts.

    Accepts :class:`deadneuron.rules.Finding` values or their ``to_dict()`` (as stored in a Report's JSON).
    Swaps at several site lists become one swap at their union where they agree on the activation; a
    later conflicting op of a kind already planned is dropped, with a note saying so.
    """
    ops: dict[str, Op] = {}
    notes: list[str] = []
    for finding in map(Finding.from_dict, findings):
        if not finding.fixes:
            continue
        for suggested in finding.fixes[0].ops:
            op = replace(suggested, reason=f"rule {finding.rule}")
            if isinstance(op, SwapActivation):  # a finding names sites: select exactly those
                op = replace(op, sites=tuple(site_selector(s) for s in op.sites))
            _add_op(ops, op, notes)
    return Plan(tuple(ops.values()), tuple(notes))


def _add_op(ops: dict[str, Op], op: Op, notes: list[str]) -> None:
    key = _slot(op)
    old = ops.get(key)
    if old is None:
        ops[key] = op
    elif (isinstance(old, SwapActivation) and isinstance(op, SwapActivation) and _same_swap(old, op)) or (
        isinstance(old, AddBatchNorm) and isinstance(op, AddBatchNorm)
    ):
        ops[key] = replace(old, sites=_union_sites(old.sites, op.sites), reason=_reasons(old.reason, op.reason))
    elif isinstance(old, ReinitDead) and isinstance(op, ReinitDead):
        ops[key] = replace(old, channels=_union_channels(old.channels, op.channels), reason=_reasons(old.reason, op.reason))
    elif old != op:
        notes.append(f"kept '{old.describe()}' ({old.reason}); dropped '{op.describe()}' ({op.reason})")


def _reasons(a: str, b: str) -> str:
    return ", ".join(dict.fromkeys(r for r in (*a.split(", "), b) if r))


def _same_swap(a: SwapActivation, b: SwapActivation) -> bool:
    return (a.to, a.negative_slope, a.source) == (b.to, b.negative_slope, b.source)


def _union_sites(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """Both selections; an empty one means every site, so it wins."""
    return () if not a or not b else tuple(dict.fromkeys((*a, *b)))


def _union_channels(a: Channels | None, b: Channels | None) -> Channels | None:
    if a is None or b is None:
        return None
    both: dict[str, set[int]] = {}
    for site, ids in (*a, *b):
        both.setdefault(site, set()).update(ids)
    return tuple((site, tuple(sorted(ids))) for site, ids in both.items())


__all__ = [
    "AddBatchNorm",
    "InsertDropout",
    "Op",
    "Plan",
    "ReinitDead",
    "SetHyperParameter",
    "SwapActivation",
    "op_from_dict",
    "plan_from_findings",
    "plan_from_flags",
]
