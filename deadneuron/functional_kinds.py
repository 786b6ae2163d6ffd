"""Functional activation calls: which torch function computes which activation kind.

`FunctionalActivations` looks up a function seen by the functional probe (``F.relu``, ``torch.tanh``,
``x.relu()``, ``x.clamp(min=0)``...) and returns its `ActivationSpec`; for a function that looks like
an activation but is not measured (``F.glu``: it halves the channel dim) it returns `Unmeasured`, which
the probe turns into a warning. A registry (`deadneuron.registry`) adds the torch functions a user
declared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from deadneuron.activations import ActivationKind, ActivationSpec

if TYPE_CHECKING:
    from deadneuron.registry import ActivationRegistry

Args = tuple[Any, ...]
Maker = Callable[[Args, Mapping[str, Any]], "ActivationSpec | Unmeasured | Part | None"]


@dataclass(frozen=True)
class Unmeasured:
    """A function that looks like an activation but is not measured, and why."""

    reason: str


@dataclass(frozen=True)
class Part:
    """A function that is no activation alone (``torch.erf``), measured only as part of one written out
    (``x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))``: `deadneuron.probe.written`)."""


PART = Part()


GLU_REASON = "halves the channel dim (a * sigmoid(b) over two halves), so it is not measured as an activation"


def _arg(args: Args, kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _number(x: Any) -> float | None:
    """A plain Python number (a tensor bound is not read: that would sync with the host)."""
    return float(x) if isinstance(x, Real) and not isinstance(x, bool) else None


def _clamp(args: Args, kwargs: Mapping[str, Any]) -> ActivationSpec | None:
    """``clamp(min=0)`` is a ReLU, ``clamp(0, 6)`` a ReLU6, ``clamp(a, b)`` a hardtanh; other
    clamps (one bound other than min=0, tensor bounds) are not activations."""
    lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    lo_n, hi_n = _number(lo), _number(hi)
    if hi is None and lo_n == 0.0:
        return ActivationSpec(ActivationKind.RELU)
    if lo_n is None or hi_n is None or lo_n > hi_n:
        return None
    if (lo_n, hi_n) == (0.0, 6.0):
        return ActivationSpec(ActivationKind.RELU6)
    return ActivationSpec(ActivationKind.HARDTANH, (("min_val", lo_n), ("max_val", hi_n)))


def _clamp_min(args: Args, kwargs: Mapping[str, Any]) -> ActivationSpec | None:
    return ActivationSpec(ActivationKind.RELU) if _number(_arg(args, kwargs, 1, "min", None)) == 0.0 else None


def _with(kind: ActivationKind, *params: tuple[int, str, float]) -> Maker:
    """A maker reading ``params`` (position, name, default) as numbers; a call passing a tensor for
    one is not taken as that activation (reading it would sync with the host)."""

    def make(a: Args, kw: Mapping[str, Any]) -> ActivationSpec | None:
        values = tuple((name, _number(_arg(a, kw, i, name, d))) for i, name, d in params)
        if any(v is None for _, v in values):
            return None
        return ActivationSpec(kind, values)

    return make


def _constant(spec: ActivationSpec) -> Maker:
    """A maker that ignores the call's arguments."""

    def make(a: Args, kw: Mapping[str, Any]) -> ActivationSpec:
        return spec

    return make


def _functional_table() -> dict[Any, Maker]:
    K = ActivationKind
    T = torch.Tensor
    table: dict[Any, Maker] = {}

    def add(fns: tuple[Any, ...], make: Maker) -> None:
        for fn in fns:
            table[fn] = make

    def plain(kind: ActivationKind) -> Maker:
        return _constant(ActivationSpec(kind))

    add((F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_), plain(K.RELU))
    add((F.relu6,), plain(K.RELU6))
    add((F.leaky_relu, F.leaky_relu_), _with(K.LEAKY_RELU, (1, "negative_slope", 0.01)))
    add((F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_), _with(K.RRELU, (1, "lower", 1 / 8), (2, "upper", 1 / 3)))
    add((F.elu, F.elu_), _with(K.ELU, (1, "alpha", 1.0)))
    add((F.selu, F.selu_, torch.selu, torch.selu_), plain(K.SELU))
    add((F.celu, F.celu_), _with(K.CELU, (1, "alpha", 1.0)))
    add((F.gelu,), lambda a, kw: ActivationSpec(K.GELU, (("approximate", str(_arg(a, kw, 1, "approximate", "none"))),)))
    add((F.silu,), plain(K.SILU))
    add((F.mish,), plain(K.MISH))
    add((F.hardswish,), plain(K.HARDSWISH))
    add((F.softplus,), _with(K.SOFTPLUS, (1, "beta", 1.0), (2, "threshold", 20.0)))
    add((torch.sigmoid, torch.sigmoid_, T.sigmoid, T.sigmoid_, F.sigmoid, torch.special.expit), plain(K.SIGMOID))
    add((F.hardsigmoid,), plain(K.HARDSIGMOID))
    add((F.logsigmoid,), plain(K.LOGSIGMOID))
    add((torch.tanh, torch.tanh_, T.tanh, T.tanh_, F.tanh), plain(K.TANH))
    add((F.hardtanh, F.hardtanh_), _with(K.HARDTANH, (1, "min_val", -1.0), (2, "max_val", 1.0)))
    add((F.softsign,), plain(K.SOFTSIGN))
    add((F.threshold, torch.threshold, torch.threshold_),  # F.threshold_ is torch.threshold_
        _with(K.THRESHOLD, (1, "threshold", 0.0), (2, "value", 0.0)))  # fmt: skip
    add((F.hardshrink, torch.hardshrink, T.hardshrink), _with(K.HARDSHRINK, (1, "lambd", 0.5)))
    add((F.softshrink,), _with(K.SOFTSHRINK, (1, "lambd", 0.5)))
    add((F.tanhshrink,), plain(K.TANHSHRINK))
    add((torch.clamp, torch.clamp_, T.clamp, T.clamp_, torch.clip, torch.clip_, T.clip, T.clip_), _clamp)
    add((torch.clamp_min, torch.clamp_min_, T.clamp_min, T.clamp_min_), _clamp_min)
    add((F.prelu, torch.prelu), lambda a, kw: ActivationSpec(K.PRELU, prelu_weight=_arg(a, kw, 1, "weight", None)))
    add((F.glu,), lambda a, kw: Unmeasured(GLU_REASON))
    add((torch.erf, T.erf, torch.special.erf), lambda a, kw: PART)
    add((torch.where, T.where, torch.maximum, T.maximum), lambda a, kw: PART)  # a ReLU written by hand, perhaps
    return table


class FunctionalActivations:
    """Lookup of functional activation calls (``F.relu``, ``torch.tanh``, ``x.relu()``...), with the
    torch functions of ``registry`` (a user's declared kinds) added."""

    def __init__(self, registry: ActivationRegistry | None = None) -> None:
        self._table = _functional_table()
        if registry is not None:
            for func, custom in registry.functions().items():
                self._table[func] = _constant(ActivationSpec(ActivationKind.CUSTOM, custom=custom))

    def makers(self) -> Mapping[Any, Maker]:
        """Every function looked up here (torch's and the registry's), to what makes its spec from a call's
        arguments (the functional probe binds them once)."""
        return MappingProxyType(self._table)

    def lookup(self, func: Any, args: Args, kwargs: Mapping[str, Any] | None) -> ActivationSpec | Unmeasured | Part | None:
        """The activation ``func(*args, **kwargs)`` computes, `Unmeasured` if it is one that is not
        measured, `Part` if only as part of one written out, None if it is not an activation."""
        make = self._table.get(func)
        if make is None:
            return None
        return make(args, kwargs or {})

    def spec(self, func: Any, args: Args, kwargs: Mapping[str, Any] | None) -> ActivationSpec | None:
        found = self.lookup(func, args, kwargs)
        return found if isinstance(found, ActivationSpec) else None

    @staticmethod
    def name(func: Any) -> str:
        """The function's name without an in-place ``_`` (``relu`` for ``relu_``)."""
        return str(getattr(func, "__name__", func)).rstrip("_")

    @staticmethod
    def site_name(func: Any) -> str:
        """The name a site takes from the function: `name` without a private ``_`` (``F.threshold``)."""
        name = FunctionalActivations.name(func)
        return name.lstrip("_") or name

    @staticmethod
    def inplace(func: Any, kwargs: Mapping[str, Any] | None) -> bool:
        """Whether the call overwrites its input: ``relu_``, or ``inplace=True`` (torch's Python
        functionals pass ``inplace`` to ``__torch_function__`` as a keyword, even when given by position)."""
        return str(getattr(func, "__name__", "")).endswith("_") or bool((kwargs or {}).get("inplace", False))
