"""Patch plans: frozen ops, built from CLI flags or from the rule engine's findings (DESIGN section 6).

Pure: values in, values out; no model, no file, no torch. An op's ``to_dict()`` is the same plain JSON the
rule engine writes into a finding's ``patch_ops`` (``{"op": "swap_activation", "activation": "leaky_relu",
...}``), and :func:`op_from_dict` reads both, so a plan built from a finding and one built from the flags
that finding's command names are equal.

Selectors (``sites`` of a swap or of an added BatchNorm, ``after`` of a dropout) are shell globs matched
against site names (``encoder.bn_layers.2>relu``), module names (``encoder.relu``) and kinds (``relu`` or
``kind:relu``); an empty selector means "every site of the source kind" (a swap), "every site fed by a
conv layer" (BatchNorm) or "between conv layers" (a dropout).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from deadneuron.errors import UsageError
from deadneuron.select import site_selector

ActivationName = Literal["relu", "leaky", "gelu", "elu", "silu", "prelu"]
ACTIVATION_NAMES: tuple[str, ...] = get_args(ActivationName)
HyperParameter = Literal["learning_rate", "epochs"]
HYPER_PARAMETERS: tuple[str, ...] = get_args(HyperParameter)
BETWEEN_CONVS = "between_convs"

# Names the rule engine and other tools use for the same activation.
_ACTIVATION_ALIASES = {"leaky_relu": "leaky", "leakyrelu": "leaky", "swish": "silu"}


def activation_name(text: str) -> ActivationName:
    """``"leaky_relu"`` / ``"LeakyReLU"`` / ``"leaky"`` -> ``"leaky"``; a UsageError for unknown ones."""
    key = text.strip().lower()
    key = _ACTIVATION_ALIASES.get(key, key)
    if key not in ACTIVATION_NAMES:
        raise UsageError(f"--activation {text!r}: not one of {', '.join(ACTIVATION_NAMES)}")
    return key  # type: ignore[return-value]


def kind_of(name: ActivationName) -> str:
    """The :class:`deadneuron.activations.ActivationKind` value of an activation name."""
    return "leaky_relu" if name == "leaky" else name


@dataclass(frozen=True)
class SwapActivation:
    """Replace the activations selected by ``sites`` (default: every ``source`` site) with ``to``."""

    to: ActivationName
    negative_slope: float | None = None  # leaky only; None: 0.01, or the config's NEGATIVE_SLOPE
    sites: tuple[str, ...] = ()
    source: str = "relu"  # the kind replaced where ``sites`` is empty
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        slope = f"(negative_slope={_num(self.negative_slope)})" if self.negative_slope is not None else ""
        where = f" at {_few(self.sites)}" if self.sites else f" at every {self.source} site"
        return f"swap activation -> {self.to}{slope}{where}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "swap_activation", "activation": kind_of(self.to)}
        if self.negative_slope is not None:
            out["negative_slope"] = self.negative_slope
        out["sites"] = list(self.sites)
        if self.source != "relu":
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class InsertDropout:
    """Dropout with probability ``p`` after the activations selected by ``after`` (default: between convs)."""

    p: float
    after: tuple[str, ...] = ()
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        where = f"after {_few(self.after)}" if self.after else "between conv layers"
        return f"insert dropout p={_num(self.p)} {where}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "insert_dropout", "where": BETWEEN_CONVS if not self.after else "after", "p": self.p}
        if self.after:
            out["after"] = list(self.after)
        return out


@dataclass(frozen=True)
class SetHyperParameter:
    """Set a training hyper-parameter to ``value``, or scale its current value by ``scale``."""

    name: HyperParameter
    value: float | None = None
    scale: float | None = None
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        how = f"= {_num(self.value)}" if self.value is not None else f"x {_num(self.scale)}"
        return f"set {self.name} {how}"

    def to_dict(self) -> dict[str, Any]:
        key, number = ("value", self.value) if self.value is not None else ("scale", self.scale)
        return {"op": "set_hparam", "name": self.name, key: number}


@dataclass(frozen=True)
class ReinitDead:
    """Re-initialise dead channels (ReDo): ``channels`` per site, or None for every dead channel an audit finds."""

    channels: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    reset_optimizer_state: bool = True
    reason: str = field(default="", compare=False)
    sites: tuple[str, ...] = ()  # without channels: only the dead channels at these sites (globs)

    def describe(self) -> str:
        if self.channels is None:
            where = f" at {_few(self.sites)}" if self.sites else ""
            return f"re-initialise every dead channel the audit finds{where}"
        count = sum(len(ids) for _, ids in self.channels)
        return f"re-initialise {count} dead channel(s) at {_few([s for s, _ in self.channels])}"

    def to_dict(self) -> dict[str, Any]:
        chans = None if self.channels is None else {site: list(ids) for site, ids in self.channels}
        out = {"op": "reinit_dead", "channels": chans, "reset_optimizer_state": self.reset_optimizer_state}
        return {**out, "sites": list(self.sites)} if self.sites else out


@dataclass(frozen=True)
class AddBatchNorm:
    """BatchNorm after the conv (or linear) layer that feeds each site selected by ``sites`` (default:
    every site fed directly by a conv layer). ``layer:NAME`` selects a layer itself (resolved plans)."""

    sites: tuple[str, ...] = ()
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        if not self.sites:
            return "add BatchNorm after the conv layers feeding every site"
        layers = [s.removeprefix("layer:") for s in self.sites if s.startswith("layer:")]
        sites = [s for s in self.sites if not s.startswith("layer:")]
        where = [f"the conv/linear layers feeding {_few(sites)}"] if sites else []
        where += [_few(layers)] if layers else []
        return f"add BatchNorm after {' and '.join(where)}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": "add_batchnorm", "sites": list(self.sites)}


Op = SwapActivation | InsertDropout | SetHyperParameter | ReinitDead | AddBatchNorm


@dataclass(frozen=True)
class Plan:
    """An ordered tuple of ops, at most one of each kind (one per hyper-parameter)."""

    ops: tuple[Op, ...] = ()
    notes: tuple[str, ...] = ()  # what planning dropped or merged, for the user

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


def op_from_dict(data: Mapping[str, Any]) -> Op:
    """One op from its plain JSON (a plan file or a finding's ``patch_ops``); UsageError if malformed."""
    kind = data.get("op")
    try:
        if kind == "swap_activation":
            slope = data.get("negative_slope")
            return SwapActivation(activation_name(str(data["activation"])), None if slope is None else float(slope),
                                  tuple(data.get("sites") or ()), str(data.get("source", "relu")))  # fmt: skip
        if kind == "insert_dropout":
            after = () if data.get("where", BETWEEN_CONVS) == BETWEEN_CONVS else tuple(data.get("after") or ())
            return InsertDropout(_probability(float(data["p"])), after)
        if kind == "set_hparam":
            return _hparam(str(data["name"]), data.get("value"), data.get("scale"))
        if kind == "reinit_dead":
            chans = data.get("channels")
            frozen = None if chans is None else tuple((str(s), tuple(int(c) for c in ids)) for s, ids in chans.items())
            return ReinitDead(frozen, bool(data.get("reset_optimizer_state", True)), sites=tuple(data.get("sites") or ()))
        if kind == "add_batchnorm":
            return AddBatchNorm(tuple(str(s) for s in data.get("sites") or ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"malformed patch op {dict(data)!r}: {type(exc).__name__}: {exc}") from None
    raise UsageError(f"unknown patch op {kind!r}; known: swap_activation, insert_dropout, set_hparam, reinit_dead, "
                     "add_batchnorm")


def _hparam(name: str, value: Any, scale: Any) -> SetHyperParameter:
    if name not in HYPER_PARAMETERS:
        raise UsageError(f"unknown hyper-parameter {name!r}; known: {', '.join(HYPER_PARAMETERS)}")
    if (value is None) == (scale is None):
        raise UsageError(f"set {name}: give exactly one of a value and a scale")
    if name == "epochs":
        if scale is not None or int(value) < 1:
            raise UsageError(f"--epochs must be a whole number >= 1, got {value if scale is None else 'a scale'}")
        return SetHyperParameter("epochs", value=int(value))
    number = float(value if value is not None else scale)
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"the learning rate {'scale' if scale is not None else ''} must be > 0, got {number}")
    return SetHyperParameter("learning_rate", value=number if value is not None else None,
                             scale=number if scale is not None else None)  # fmt: skip


def _probability(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise UsageError(f"dropout probability must be in (0, 1), got {p}")
    return p


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
    if negative_slope is not None and (activation is None or activation_name(activation) != "leaky"):
        raise UsageError("--negative-slope applies to --activation leaky only")
    if negative_slope is not None and not (math.isfinite(negative_slope) and 0 <= negative_slope < 1):
        raise UsageError(f"--negative-slope must be in [0, 1), got {negative_slope}")
    if sites and activation is None and not reinit_dead and not add_batchnorm:
        raise UsageError(
            "--select chooses the sites of --activation, --reinit-dead or --add-batchnorm: add one of them"
        )
    ops: list[Op] = []
    if activation is not None:
        ops.append(SwapActivation(activation_name(activation), negative_slope, tuple(sites), reason="flag"))
    if dropout_between_convs is not None:
        ops.append(InsertDropout(_probability(dropout_between_convs), reason="flag"))
    if lr is not None or lr_scale is not None:
        ops.append(replace(_hparam("learning_rate", lr, lr_scale), reason="flag"))
    if epochs is not None:
        ops.append(replace(_hparam("epochs", epochs, None), reason="flag"))
    if reinit_dead:
        ops.append(ReinitDead(reason="flag", sites=tuple(sites)))
    if add_batchnorm:
        ops.append(AddBatchNorm(tuple(sites), reason="flag"))
    return Plan(tuple(ops))


def plan_from_findings(findings: Iterable[Any]) -> Plan:
    """The preferred fix (``patch_ops[0]``) of every finding, merged: most severe first, as the engine sorts.

    Accepts :class:`deadneuron.rules.Finding` values or their ``to_dict()`` (as stored in a Report). Swaps
    at several site lists merge into one swap at their union where they agree on the activation; a later
    conflicting op of a kind already planned is dropped, with a note saying so.
    """
    ops: dict[str, Op] = {}
    notes: list[str] = []
    for finding in findings:
        data = finding.to_dict() if hasattr(finding, "to_dict") else dict(finding)
        fixes = data.get("patch_ops") or []
        if not fixes:
            continue
        rule = str(data.get("rule", "?"))
        for raw in fixes[0]:
            op = replace(op_from_dict(raw), reason=f"rule {rule}")
            if isinstance(op, SwapActivation):  # a finding names sites: select exactly those
                op = replace(op, sites=tuple(site_selector(s) for s in op.sites))
            _merge(ops, op, notes)
    return Plan(tuple(ops.values()), tuple(notes))


def _merge(ops: dict[str, Op], op: Op, notes: list[str]) -> None:
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
    """Two selections merged; an empty one means every site, so it wins."""
    return () if not a or not b else tuple(dict.fromkeys((*a, *b)))


def _union_channels(
    a: tuple[tuple[str, tuple[int, ...]], ...] | None, b: tuple[tuple[str, tuple[int, ...]], ...] | None
) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    if a is None or b is None:
        return None
    merged: dict[str, set[int]] = {}
    for site, ids in (*a, *b):
        merged.setdefault(site, set()).update(ids)
    return tuple((site, tuple(sorted(ids))) for site, ids in merged.items())


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    if x != 0 and abs(x) < 1e-2:
        mantissa, exponent = f"{x:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def _few(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


__all__ = [
    "ACTIVATION_NAMES",
    "ActivationName",
    "AddBatchNorm",
    "InsertDropout",
    "Op",
    "Plan",
    "ReinitDead",
    "SetHyperParameter",
    "SwapActivation",
    "activation_name",
    "kind_of",
    "op_from_dict",
    "plan_from_findings",
    "plan_from_flags",
]
