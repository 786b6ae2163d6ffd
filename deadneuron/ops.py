"""Patch operations (DESIGN section 6): the one vocabulary the rules suggest fixes in and the patcher applies.

Frozen values: swap an activation, insert dropout, set a hyper-parameter, re-initialise dead channels, add
BatchNorm. Each says what it does (``describe``), what it is as plain JSON (``to_dict``, what a finding's
``patch_ops`` and a plan file hold; :func:`op_from_dict` reads it back) and which ``deadneuron patch`` flags
request it (``flags``). Pure: values in, values out.

Selectors (``sites`` of a swap or of an added BatchNorm, ``after`` of a dropout) are shell globs matched
against site names (``encoder.bn_layers.2>relu``), module names (``encoder.relu``) and kinds (``relu`` or
``kind:relu``); an empty selector means "every site of the source kind" (a swap), "every site fed by a
conv layer" (BatchNorm) or "between conv layers" (a dropout). A fix suggested by a rule names its sites
exactly; ``flags`` turns each into a ``--select`` that selects exactly that site.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from deadneuron.errors import UsageError
from deadneuron.replacements import SwapName, kind_of, replacement
from deadneuron.select import site_selector

DEFAULT_CHECKPOINT = "checkpoints/slot_attention.pth"  # what `deadneuron patch` patches when given no checkpoint
HyperParameter = Literal["learning_rate", "epochs"]
HYPER_PARAMETERS: tuple[str, ...] = get_args(HyperParameter)
BETWEEN_CONVS = "between_convs"
Channels = tuple[tuple[str, tuple[int, ...]], ...]  # (site, channel ids) pairs


def compact(x: float | None) -> str:
    """Short number text: ``1e-4``, ``5e-5``, ``0.01``, ``3`` (``?`` for None)."""
    if x is None:
        return "?"
    if x != 0 and abs(x) < 1e-2:
        mantissa, exponent = f"{x:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def select_flags(sites: Iterable[str]) -> tuple[str, ...]:
    """``--select`` per site, each selecting exactly its site (:func:`deadneuron.select.site_selector`)."""
    return tuple(word for site in sites for word in ("--select", site_selector(site)))


def _few(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


@dataclass(frozen=True)
class SwapActivation:
    """Replace the activations selected by ``sites`` (default: every ``source`` site) with ``to``."""

    to: SwapName
    negative_slope: float | None = None  # leaky only; None: 0.01, or the config's NEGATIVE_SLOPE
    sites: tuple[str, ...] = ()
    source: str = "relu"  # the kind replaced where ``sites`` is empty
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        slope = f"(negative_slope={compact(self.negative_slope)})" if self.negative_slope is not None else ""
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

    def flags(self, *, adapter_model: bool = False) -> tuple[str, ...]:
        slope = ("--negative-slope", compact(self.negative_slope)) if self.negative_slope is not None else ()
        return ("--activation", self.to, *slope, *select_flags(self.sites))


@dataclass(frozen=True)
class InsertDropout:
    """Dropout with probability ``p`` after the activations selected by ``after`` (default: between convs)."""

    p: float
    after: tuple[str, ...] = ()
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        where = f"after {_few(self.after)}" if self.after else "between conv layers"
        return f"insert dropout p={compact(self.p)} {where}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "insert_dropout", "where": BETWEEN_CONVS if not self.after else "after", "p": self.p}
        if self.after:
            out["after"] = list(self.after)
        return out

    def flags(self, *, adapter_model: bool = False) -> tuple[str, ...]:
        if self.after:
            raise ValueError(f"{self.describe()}: no deadneuron patch flag places dropout after chosen sites")
        return ("--dropout-between-convs", compact(self.p))


@dataclass(frozen=True)
class SetHyperParameter:
    """Set a training hyper-parameter to ``value``, or scale its current value by ``scale``."""

    name: HyperParameter
    value: float | None = None
    scale: float | None = None
    reason: str = field(default="", compare=False)

    def describe(self) -> str:
        how = f"= {compact(self.value)}" if self.value is not None else f"x {compact(self.scale)}"
        return f"set {self.name} {how}"

    def to_dict(self) -> dict[str, Any]:
        key, number = ("value", self.value) if self.value is not None else ("scale", self.scale)
        return {"op": "set_hparam", "name": self.name, key: number}

    def flags(self, *, adapter_model: bool = False) -> tuple[str, ...]:
        if self.name == "epochs":
            return ("--epochs", str(self.value))
        return ("--lr", compact(self.value)) if self.value is not None else ("--lr-scale", compact(self.scale))


@dataclass(frozen=True)
class ReinitDead:
    """Re-initialise dead channels (ReDo): ``channels`` per site, or None for every dead channel an audit finds."""

    channels: Channels | None = None
    reset_optimizer_state: bool = True
    reason: str = field(default="", compare=False)
    sites: tuple[str, ...] = ()  # without channels: only the dead channels at these sites (globs)

    @classmethod
    def of(cls, channels: Mapping[str, Sequence[int]]) -> ReinitDead:
        """The dead ``channels`` of each site (a finding's), as named."""
        return cls(tuple((site, tuple(int(c) for c in ids)) for site, ids in channels.items()))

    @property
    def channel_sites(self) -> tuple[str, ...]:
        """The sites whose channels are named (none without channel lists)."""
        return tuple(site for site, _ in self.channels or ())

    def describe(self) -> str:
        if self.channels is None:
            where = f" at {_few(self.sites)}" if self.sites else ""
            return f"re-initialise every dead channel the audit finds{where}"
        count = sum(len(ids) for _, ids in self.channels)
        return f"re-initialise {count} dead channel(s) at {_few(self.channel_sites)}"

    def to_dict(self) -> dict[str, Any]:
        chans = None if self.channels is None else {site: list(ids) for site, ids in self.channels}
        out = {"op": "reinit_dead", "channels": chans, "reset_optimizer_state": self.reset_optimizer_state}
        return {**out, "sites": list(self.sites)} if self.sites else out

    def flags(self, *, adapter_model: bool = False) -> tuple[str, ...]:
        """Re-initialising the channels of a model ``deadneuron patch`` retrains (``adapter_model``: a
        deadneuron checkpoint, or a model of your own with ``--train``) needs its trained weights
        (``--init checkpoint``; from scratch every weight is fresh anyway)."""
        sites = self.channel_sites if self.channels is not None else self.sites
        return ("--reinit-dead", *select_flags(sites), *(("--init", "checkpoint") if adapter_model else ()))


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

    def flags(self, *, adapter_model: bool = False) -> tuple[str, ...]:
        return ("--add-batchnorm", *select_flags(self.sites))


Op = SwapActivation | InsertDropout | SetHyperParameter | ReinitDead | AddBatchNorm
OP_NAMES = ("swap_activation", "insert_dropout", "set_hparam", "reinit_dead", "add_batchnorm")


def op_from_dict(data: Mapping[str, Any]) -> Op:
    """One op from its plain JSON (a plan file or a finding's ``patch_ops``); UsageError if malformed."""
    kind = data.get("op")
    try:
        if kind == "swap_activation":
            slope = data.get("negative_slope")
            return SwapActivation(replacement(str(data["activation"])).name, None if slope is None else float(slope),
                                  tuple(data.get("sites") or ()), str(data.get("source", "relu")))  # fmt: skip
        if kind == "insert_dropout":
            after = () if data.get("where", BETWEEN_CONVS) == BETWEEN_CONVS else tuple(data.get("after") or ())
            return InsertDropout(probability(float(data["p"])), after)
        if kind == "set_hparam":
            return hyper_parameter(str(data["name"]), data.get("value"), data.get("scale"))
        if kind == "reinit_dead":
            chans = data.get("channels")
            frozen = None if chans is None else tuple((str(s), tuple(int(c) for c in ids)) for s, ids in chans.items())
            return ReinitDead(frozen, bool(data.get("reset_optimizer_state", True)), sites=tuple(data.get("sites") or ()))
        if kind == "add_batchnorm":
            return AddBatchNorm(tuple(str(s) for s in data.get("sites") or ()))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"malformed patch op {dict(data)!r}: {type(exc).__name__}: {exc}") from None
    raise UsageError(f"unknown patch op {kind!r}; known: {', '.join(OP_NAMES)}")


def hyper_parameter(name: str, value: Any, scale: Any) -> SetHyperParameter:
    """A checked SetHyperParameter: exactly one of ``value`` and ``scale``, whole epochs >= 1, a learning
    rate (or its scale) > 0."""
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


def probability(p: float) -> float:
    """``p`` checked: a dropout probability in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise UsageError(f"dropout probability must be in (0, 1), got {p}")
    return p


__all__ = [
    "BETWEEN_CONVS",
    "HYPER_PARAMETERS",
    "AddBatchNorm",
    "Channels",
    "HyperParameter",
    "InsertDropout",
    "Op",
    "ReinitDead",
    "SetHyperParameter",
    "SwapActivation",
    "compact",
    "hyper_parameter",
    "op_from_dict",
    "probability",
    "select_flags",
]
