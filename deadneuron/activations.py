"""Activation kinds: how to recognise one (module or functional call) and where it is flat.

The flat region of an activation f is where its derivative is small: |f'(z)| <= delta * max |f'|
(DESIGN section 3). It is *derived from the function*, not typed in per kind: `flat_region` evaluates
f' by autograd on a fine float64 grid once and keeps the tails of the grid (the part connected to
-inf, and the part connected to +inf) where the derivative is small. ReLU gives z <= 0, ReLU6 adds
z >= 6, LeakyReLU(0.01) gives z <= 0, GELU about z <= -2.4, Tanh |z| >= 2.2, Sigmoid |z| >= 4.4.

A non-decreasing activation that is strictly increasing outside its flat region maps the tail
z <= lo exactly onto a <= f(lo), so its flat count can be read from the output (which survives an
in-place call). The others (GELU, SiLU, Mish, Hardswish, PReLU) are read from z in a pre-hook.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_INF = float("inf")
_GRID_SCALE = 1000  # grid step 1e-3, with 0 exactly on the grid
_GRID_STEPS = 30 * _GRID_SCALE  # z in [-30, 30]


class ActivationKind(StrEnum):
    RELU = "relu"
    RELU6 = "relu6"
    LEAKY_RELU = "leaky_relu"
    PRELU = "prelu"
    ELU = "elu"
    SELU = "selu"
    CELU = "celu"
    GELU = "gelu"
    SILU = "silu"
    MISH = "mish"
    HARDSWISH = "hardswish"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    HARDTANH = "hardtanh"


# Kinds whose function is non-decreasing and strictly increasing outside the flat region.
_MONOTONE = frozenset(
    {
        ActivationKind.RELU,
        ActivationKind.RELU6,
        ActivationKind.ELU,
        ActivationKind.SELU,
        ActivationKind.CELU,
        ActivationKind.SOFTPLUS,
        ActivationKind.SIGMOID,
        ActivationKind.TANH,
        ActivationKind.HARDTANH,
    }
)


@dataclass(frozen=True)
class FlatRegion:
    """z in (-inf, lo] or [hi, +inf) is flat. ``lo`` may be per channel (PReLU)."""

    lo: float | torch.Tensor
    hi: float
    on_output: bool  # True: test a <= out_lo / a >= out_hi instead of z
    out_lo: float = -_INF
    out_hi: float = _INF

    @property
    def empty(self) -> bool:
        return not isinstance(self.lo, torch.Tensor) and self.lo == -_INF and self.hi == _INF

    def describe(self) -> str:
        if isinstance(self.lo, torch.Tensor):
            return "z <= 0 on channels whose PReLU slope is small"
        parts = []
        if self.lo != -_INF:
            parts.append(f"z <= {self.lo:.3g}")
        if self.hi != _INF:
            parts.append(f"z >= {self.hi:.3g}")
        return " or ".join(parts) or "none"


@dataclass(frozen=True)
class ActivationSpec:
    """One activation function with its parameters."""

    kind: ActivationKind
    params: tuple[tuple[str, Any], ...] = ()
    prelu_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        if not self.params:
            return self.kind.value
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind.value}({inner})"

    def param(self, name: str, default: Any) -> Any:
        return dict(self.params).get(name, default)

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return _FUNCTIONS[self.kind](self)

    @property
    def monotone(self) -> bool:
        if self.kind is ActivationKind.LEAKY_RELU:
            return float(self.param("negative_slope", 0.01)) >= 0
        return self.kind in _MONOTONE


_FUNCTIONS: dict[ActivationKind, Callable[[ActivationSpec], Callable[[torch.Tensor], torch.Tensor]]] = {
    ActivationKind.RELU: lambda s: F.relu,
    ActivationKind.RELU6: lambda s: F.relu6,
    ActivationKind.LEAKY_RELU: lambda s: lambda z: F.leaky_relu(z, float(s.param("negative_slope", 0.01))),
    ActivationKind.PRELU: lambda s: lambda z: F.leaky_relu(z, float(s.param("slope", 0.25))),
    ActivationKind.ELU: lambda s: lambda z: F.elu(z, float(s.param("alpha", 1.0))),
    ActivationKind.SELU: lambda s: F.selu,
    ActivationKind.CELU: lambda s: lambda z: F.celu(z, float(s.param("alpha", 1.0))),
    ActivationKind.GELU: lambda s: lambda z: F.gelu(z, approximate=str(s.param("approximate", "none"))),
    ActivationKind.SILU: lambda s: F.silu,
    ActivationKind.MISH: lambda s: F.mish,
    ActivationKind.HARDSWISH: lambda s: F.hardswish,
    ActivationKind.SOFTPLUS: lambda s: lambda z: F.softplus(
        z, float(s.param("beta", 1.0)), float(s.param("threshold", 20.0))
    ),
    ActivationKind.SIGMOID: lambda s: torch.sigmoid,
    ActivationKind.TANH: lambda s: torch.tanh,
    ActivationKind.HARDTANH: lambda s: lambda z: F.hardtanh(
        z, float(s.param("min_val", -1.0)), float(s.param("max_val", 1.0))
    ),
}


def _tails(small: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """(lo, hi): the grid's left and right runs of True, as thresholds (-inf/inf where absent)."""
    lo, hi = -_INF, _INF
    if bool(small[0]):
        first_big = int(torch.argmin(small.to(torch.int8)).item()) if not bool(small.all()) else len(small)
        lo = float(grid[first_big - 1])
    if bool(small[-1]):
        rev = small.flip(0)
        first_big = int(torch.argmin(rev.to(torch.int8)).item()) if not bool(rev.all()) else len(rev)
        hi = float(grid[len(grid) - first_big])
    return lo, hi


def _prelu_region(spec: ActivationSpec, delta: float) -> FlatRegion:
    w = spec.prelu_weight
    if w is None:
        slope = abs(float(spec.param("slope", 0.25)))
        flat = slope <= delta * max(1.0, slope)
        return FlatRegion(lo=0.0 if flat else -_INF, hi=_INF, on_output=False)
    w = w.detach().double().abs()
    flat = w <= delta * torch.clamp(w, min=1.0)
    lo = torch.where(flat, 0.0, -_INF)
    if lo.numel() == 1:
        return FlatRegion(lo=float(lo.item()), hi=_INF, on_output=False)
    return FlatRegion(lo=lo, hi=_INF, on_output=False)


def flat_region(spec: ActivationSpec, delta: float) -> FlatRegion:
    """Derive the flat region of ``spec`` for ``delta`` from the function itself."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if spec.kind is ActivationKind.PRELU:
        return _prelu_region(spec, delta)
    return _derived_region(spec, delta)


@functools.lru_cache(maxsize=256)
def _derived_region(spec: ActivationSpec, delta: float) -> FlatRegion:
    """`flat_region` of a parameter-only activation: derived once per process (FlatRegion is frozen)."""
    fn = spec.function()
    with torch.inference_mode(False), torch.enable_grad():
        grid = torch.arange(-_GRID_STEPS, _GRID_STEPS + 1, dtype=torch.float64) / _GRID_SCALE
        z = grid.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(z).sum(), z)
    deriv = grad.abs()
    small = deriv <= delta * float(deriv.max())
    lo, hi = _tails(small, grid)
    if not spec.monotone:
        return FlatRegion(lo=lo, hi=hi, on_output=False)
    with torch.no_grad():
        out_lo = float(fn(torch.tensor(lo, dtype=torch.float64))) if lo != -_INF else -_INF
        out_hi = float(fn(torch.tensor(hi, dtype=torch.float64))) if hi != _INF else _INF
    return FlatRegion(lo=lo, hi=hi, on_output=True, out_lo=out_lo, out_hi=out_hi)


# --- recognising modules -------------------------------------------------------------------------

_MODULE_KINDS: tuple[tuple[type[nn.Module], ActivationKind], ...] = (
    (nn.ReLU6, ActivationKind.RELU6),  # before Hardtanh: ReLU6 subclasses it
    (nn.ReLU, ActivationKind.RELU),
    (nn.LeakyReLU, ActivationKind.LEAKY_RELU),
    (nn.PReLU, ActivationKind.PRELU),
    (nn.ELU, ActivationKind.ELU),
    (nn.SELU, ActivationKind.SELU),
    (nn.CELU, ActivationKind.CELU),
    (nn.GELU, ActivationKind.GELU),
    (nn.SiLU, ActivationKind.SILU),
    (nn.Mish, ActivationKind.MISH),
    (nn.Hardswish, ActivationKind.HARDSWISH),
    (nn.Softplus, ActivationKind.SOFTPLUS),
    (nn.Sigmoid, ActivationKind.SIGMOID),
    (nn.Tanh, ActivationKind.TANH),
    (nn.Hardtanh, ActivationKind.HARDTANH),
)


def _module_params(m: nn.Module, kind: ActivationKind) -> tuple[tuple[str, Any], ...]:
    names = {
        ActivationKind.LEAKY_RELU: ("negative_slope",),
        ActivationKind.ELU: ("alpha",),
        ActivationKind.CELU: ("alpha",),
        ActivationKind.GELU: ("approximate",),
        ActivationKind.SOFTPLUS: ("beta", "threshold"),
        ActivationKind.HARDTANH: ("min_val", "max_val"),
    }.get(kind, ())
    return tuple((n, getattr(m, n)) for n in names)


def spec_for_module(m: nn.Module) -> ActivationSpec | None:
    """The activation a module computes, or None if it is not an activation module."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(m, cls):
            weight = m.weight if isinstance(m, nn.PReLU) else None
            return ActivationSpec(kind, _module_params(m, kind), prelu_weight=weight)
    return None


def is_inplace(m: nn.Module) -> bool:
    return bool(getattr(m, "inplace", False))


# --- recognising functional calls ----------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _functional_table() -> dict[Any, Callable[[tuple[Any, ...], Mapping[str, Any]], ActivationSpec]]:
    K = ActivationKind
    plain = lambda kind: lambda a, kw: ActivationSpec(kind)  # noqa: E731
    table: dict[Any, Callable[[tuple[Any, ...], Mapping[str, Any]], ActivationSpec]] = {}

    def add(fns: tuple[Any, ...], make: Callable[[tuple[Any, ...], Mapping[str, Any]], ActivationSpec]) -> None:
        for fn in fns:
            table[fn] = make

    T = torch.Tensor
    add((F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_), plain(K.RELU))
    add((F.relu6,), plain(K.RELU6))
    add(
        (F.leaky_relu, F.leaky_relu_),
        lambda a, kw: ActivationSpec(K.LEAKY_RELU, (("negative_slope", float(_arg(a, kw, 1, "negative_slope", 0.01))),)),
    )
    add(
        (F.elu, F.elu_),
        lambda a, kw: ActivationSpec(K.ELU, (("alpha", float(_arg(a, kw, 1, "alpha", 1.0))),)),
    )
    add((F.selu, F.selu_, torch.selu, torch.selu_), plain(K.SELU))
    add((F.celu, F.celu_), lambda a, kw: ActivationSpec(K.CELU, (("alpha", float(_arg(a, kw, 1, "alpha", 1.0))),)))
    add((F.gelu,), lambda a, kw: ActivationSpec(K.GELU, (("approximate", str(_arg(a, kw, 1, "approximate", "none"))),)))
    add((F.silu,), plain(K.SILU))
    add((F.mish,), plain(K.MISH))
    add((F.hardswish,), plain(K.HARDSWISH))
    add(
        (F.softplus,),
        lambda a, kw: ActivationSpec(
            K.SOFTPLUS, (("beta", float(_arg(a, kw, 1, "beta", 1.0))), ("threshold", float(_arg(a, kw, 2, "threshold", 20.0))))
        ),
    )
    add((torch.sigmoid, torch.sigmoid_, T.sigmoid, T.sigmoid_, F.sigmoid), plain(K.SIGMOID))
    add((torch.tanh, torch.tanh_, T.tanh, T.tanh_, F.tanh), plain(K.TANH))
    add(
        (F.hardtanh, F.hardtanh_),
        lambda a, kw: ActivationSpec(
            K.HARDTANH,
            (("min_val", float(_arg(a, kw, 1, "min_val", -1.0))), ("max_val", float(_arg(a, kw, 2, "max_val", 1.0)))),
        ),
    )
    add((F.prelu, torch.prelu), lambda a, kw: ActivationSpec(K.PRELU, prelu_weight=_arg(a, kw, 1, "weight", None)))
    return table


class FunctionalActivations:
    """Lookup of functional activation calls (``F.relu``, ``torch.tanh``, ``x.relu()``...)."""

    def __init__(self) -> None:
        self._table = _functional_table()

    def spec(self, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None) -> ActivationSpec | None:
        make = self._table.get(func)
        if make is None:
            return None
        return make(args, kwargs or {})

    @staticmethod
    def name(func: Any) -> str:
        return getattr(func, "__name__", str(func)).rstrip("_")


def describe_region(spec: ActivationSpec, delta: float) -> str:
    """A short human description, e.g. 'z <= 0' (used by reports)."""
    region = flat_region(spec, delta)
    return region.describe()

