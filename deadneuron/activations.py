"""Activation kinds: how to recognise one (module or functional call) and where it is flat.

The flat region of an activation f is where its derivative is small: |f'(z)| <= delta * max |f'|
(DESIGN section 3). It is *derived from the function*, not typed in per kind: `flat_region` evaluates
f' by autograd on a fine float64 grid once, keeps the tails of the grid (the part connected to -inf,
and the part connected to +inf) where the derivative is small, and refines each boundary between two
grid points to float64 precision. ReLU gives z <= 0, ReLU6 adds z >= 6, LeakyReLU(0.01) gives z <= 0,
GELU about z <= -2.28, Tanh |z| >= 2.2, Sigmoid |z| >= 4.4, Hardsigmoid z <= -3 or z >= 3. A function
with no flat tail but one flat interval in the middle (Hardshrink, Softshrink: |z| <= lambd,
Tanhshrink: |z| <= 0.23) has that interval as its flat region.

The flat count is always taken on z (in a pre-hook where an in-place call overwrites z), never read
back from the output: the output cannot tell an infinite z from a finite one (relu(-inf) is 0), and a
non-finite pre-activation is never flat.

Functional calls are recognised by `deadneuron.functional_kinds`; kinds a user declares live in a
`deadneuron.registry.ActivationRegistry`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deadneuron.errors import UsageError

_INF = float("inf")
_GRID_SCALE = 1000  # grid step 1e-3, with 0 exactly on the grid
_GRID_STEPS = 30 * _GRID_SCALE  # z in [-30, 30]
_REFINE_POINTS = 1025  # each refinement round splits the bracket into 1024 steps
_REFINE_ROUNDS = 8  # until the bracket is two adjacent floats (1e-3 / 1024**6 is below any ulp)


class ActivationKind(StrEnum):
    RELU = "relu"
    RELU6 = "relu6"
    LEAKY_RELU = "leaky_relu"
    RRELU = "rrelu"
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
    HARDSIGMOID = "hardsigmoid"
    LOGSIGMOID = "logsigmoid"
    TANH = "tanh"
    HARDTANH = "hardtanh"
    SOFTSIGN = "softsign"
    THRESHOLD = "threshold"
    HARDSHRINK = "hardshrink"
    SOFTSHRINK = "softshrink"
    TANHSHRINK = "tanhshrink"
    CUSTOM = "custom"  # declared by the user (`deadneuron.register_activation`); reported by its name


@dataclass(frozen=True)
class FlatRegion:
    """z in (-inf, lo] or [hi, +inf) is flat. ``lo`` may be per channel (PReLU).

    With ``center`` set the region is the interval |z - center| <= lo instead (``hi`` is +inf): the
    thresholds apply to `tested` (z), which is |z - center|.
    """

    lo: float | torch.Tensor
    hi: float
    center: float | None = None

    @property
    def empty(self) -> bool:
        return not isinstance(self.lo, torch.Tensor) and self.lo == -_INF and self.hi == _INF

    def tested(self, z: torch.Tensor) -> torch.Tensor:
        """The tensor ``lo``/``hi`` apply to: ``z`` itself, or |z - center| for an interval."""
        if self.center is None:
            return z
        return z.abs() if self.center == 0 else (z - self.center).abs()

    def describe(self) -> str:
        if isinstance(self.lo, torch.Tensor):
            return "z <= 0 on channels whose PReLU slope is small"
        if self.center is not None:
            around = "|z|" if self.center == 0 else f"|z - {self.center:.3g}|"
            return f"{around} <= {self.lo:.3g}"
        if self.lo == _INF:
            return "everywhere"
        parts = []
        if self.lo != -_INF:
            parts.append(f"z <= {self.lo:.3g}")
        if self.hi != _INF:
            parts.append(f"z >= {self.hi:.3g}")
        return " or ".join(parts) or "none"


@dataclass(frozen=True, eq=False)
class CustomActivation:
    """A kind the user declared: its report name and the elementwise function that defines it.
    Compared by identity: two registrations are two kinds, even with the same name."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ActivationSpec:
    """One activation function with its parameters."""

    kind: ActivationKind
    params: tuple[tuple[str, Any], ...] = ()
    prelu_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    custom: CustomActivation | None = None

    @property
    def kind_name(self) -> str:
        """The kind as reports show it: the registered name for a user's kind."""
        return self.custom.name if self.custom is not None else self.kind.value

    @property
    def label(self) -> str:
        if not self.params:
            return self.kind_name
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind_name}({inner})"

    def param(self, name: str, default: Any) -> Any:
        return dict(self.params).get(name, default)

    def function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.custom is not None:
            return self.custom.fn
        return _FUNCTIONS[self.kind](self)


def _rrelu_slope(s: ActivationSpec) -> float:
    """RReLU in eval mode is a leaky ReLU with the mean of its slope range (the audit runs in eval)."""
    return (float(s.param("lower", 1 / 8)) + float(s.param("upper", 1 / 3))) / 2


_FUNCTIONS: dict[ActivationKind, Callable[[ActivationSpec], Callable[[torch.Tensor], torch.Tensor]]] = {
    ActivationKind.RELU: lambda s: F.relu,
    ActivationKind.RELU6: lambda s: F.relu6,
    ActivationKind.LEAKY_RELU: lambda s: lambda z: F.leaky_relu(z, float(s.param("negative_slope", 0.01))),
    ActivationKind.RRELU: lambda s: lambda z: F.leaky_relu(z, _rrelu_slope(s)),
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
    ActivationKind.HARDSIGMOID: lambda s: F.hardsigmoid,
    ActivationKind.LOGSIGMOID: lambda s: F.logsigmoid,
    ActivationKind.TANH: lambda s: torch.tanh,
    ActivationKind.HARDTANH: lambda s: lambda z: F.hardtanh(
        z, float(s.param("min_val", -1.0)), float(s.param("max_val", 1.0))
    ),
    ActivationKind.SOFTSIGN: lambda s: F.softsign,
    ActivationKind.THRESHOLD: lambda s: lambda z: F.threshold(
        z, float(s.param("threshold", 0.0)), float(s.param("value", 0.0))
    ),
    ActivationKind.HARDSHRINK: lambda s: lambda z: F.hardshrink(z, float(s.param("lambd", 0.5))),
    ActivationKind.SOFTSHRINK: lambda s: lambda z: F.softshrink(z, float(s.param("lambd", 0.5))),
    ActivationKind.TANHSHRINK: lambda s: F.tanhshrink,
}


# --- deriving the flat region --------------------------------------------------------------------


def _derivative(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """|f'(z)| by autograd (z: float64, 1-D). Inside a functorch transform (a site first called inside
    ``torch.func.vmap``), where ``requires_grad_`` is refused, by ``torch.func.grad``, which composes with it."""
    with torch.inference_mode(False), torch.enable_grad():
        inside = torch._C._functorch.maybe_current_level() is not None
        z = z.clone() if inside else z.clone().requires_grad_(True)
        out = fn(z)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the function is not elementwise: {tuple(z.shape)} in, {shape} out")
        grad: torch.Tensor
        if inside:
            grad = torch.func.grad(lambda t: fn(t).sum())(z)
        else:
            (grad,) = torch.autograd.grad(out.sum(), z)
    return grad.detach().abs()


def _edge(deriv: Callable[[torch.Tensor], torch.Tensor], small_at: float, big_at: float, limit: float) -> float:
    """The last point, going from ``small_at`` (flat) towards ``big_at`` (not flat), where the derivative
    is still small: the region's boundary to the last float64 (exact for piecewise kinds)."""
    for _ in range(_REFINE_ROUNDS):
        if math.nextafter(small_at, big_at) == big_at:
            break
        pts = torch.linspace(small_at, big_at, _REFINE_POINTS, dtype=torch.float64)
        big = ~(deriv(pts) <= limit)
        big[0] = False
        if not bool(big.any()):  # rounding left no big point inside: keep the bracket's far end
            big[-1] = True
        k = int(torch.argmax(big.to(torch.int8)))
        small_at, big_at = float(pts[k - 1]), float(pts[k])
    return small_at


def _runs(small: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) grid indices of each run of True."""
    padded = torch.cat([small.new_zeros(1), small, small.new_zeros(1)]).to(torch.int8)
    change = torch.diff(padded)
    starts = torch.nonzero(change == 1).flatten().tolist()
    ends = (torch.nonzero(change == -1).flatten() - 1).tolist()
    return list(zip(starts, ends, strict=True))


def _region_bounds(
    deriv: Callable[[torch.Tensor], torch.Tensor], grid: torch.Tensor, small: torch.Tensor, limit: float
) -> tuple[float, float, float | None]:
    """(lo, hi, center): the flat tails, or (radius, inf, center) for a single flat interval."""
    runs = _runs(small)
    last = len(grid) - 1
    if runs == [(0, last)]:  # flat everywhere (a constant function)
        return _INF, _INF, None
    lo, hi = -_INF, _INF
    if runs and runs[0][0] == 0:
        lo = _edge(deriv, float(grid[runs[0][1]]), float(grid[runs[0][1] + 1]), limit)
    if runs and runs[-1][1] == last:
        hi = _edge(deriv, float(grid[runs[-1][0]]), float(grid[runs[-1][0] - 1]), limit)
    if lo == -_INF and hi == _INF and len(runs) == 1:
        first, end = runs[0]
        left = _edge(deriv, float(grid[first]), float(grid[first - 1]), limit)
        right = _edge(deriv, float(grid[end]), float(grid[end + 1]), limit)
        center = (left + right) / 2
        return max(right - center, center - left), _INF, center
    return lo, hi, None


def _derive(spec: ActivationSpec, delta: float) -> FlatRegion:
    """The flat region of ``spec``'s function for ``delta`` (see the module doc)."""
    fn = spec.function()
    grid = torch.arange(-_GRID_STEPS, _GRID_STEPS + 1, dtype=torch.float64) / _GRID_SCALE
    deriv = functools.partial(_derivative, fn)
    d = deriv(grid)
    limit = delta * float(d.max())
    lo, hi, center = _region_bounds(deriv, grid, d <= limit, limit)
    return FlatRegion(lo=lo, hi=hi, center=center)


_derived_region = functools.lru_cache(maxsize=256)(_derive)  # built-in kinds: once per process


def _prelu_region(spec: ActivationSpec, delta: float, in_hook: bool) -> FlatRegion:
    w = spec.prelu_weight
    if w is None:
        slope = abs(float(spec.param("slope", 0.25)))
        flat = slope <= delta * max(1.0, slope)
        return FlatRegion(lo=0.0 if flat else -_INF, hi=_INF)
    w = w.detach().double().abs()
    flat_slope = w <= delta * torch.clamp(w, min=1.0)
    lo = torch.where(flat_slope, 0.0, -_INF)
    if lo.numel() == 1 and not in_hook:  # a host read: never inside a hook (it would sync on CUDA)
        return FlatRegion(lo=float(lo.reshape(())), hi=_INF)
    return FlatRegion(lo=lo, hi=_INF)


def check_eps(eps: float) -> None:
    """``eps`` (an activation with |a| <= eps counts as zero) checked: a finite number >= 0."""
    if not (math.isfinite(eps) and eps >= 0):
        raise UsageError(f"eps (--eps) must be a number >= 0, got {eps}")


def check_delta(delta: float) -> None:
    """``delta`` (flat where |f'(z)| <= delta x max |f'|) checked: in [0, 1)."""
    if not 0.0 <= delta < 1.0:
        raise UsageError(f"delta (--delta) must be in [0, 1), got {delta}")


class FlatRegions:
    """`flat_region` of each activation for one ``delta``, derived once per distinct activation (a PReLU's
    each call: its region is per weight tensor)."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self._cache: dict[ActivationSpec, FlatRegion] = {}

    def __call__(self, spec: ActivationSpec, *, in_hook: bool = False) -> FlatRegion:
        if spec.prelu_weight is not None:
            return flat_region(spec, self.delta, in_hook=in_hook)
        if spec not in self._cache:
            self._cache[spec] = flat_region(spec, self.delta)
        return self._cache[spec]


def flat_region(spec: ActivationSpec, delta: float, *, in_hook: bool = False) -> FlatRegion:
    """Derive the flat region of ``spec`` for ``delta`` from the function itself.

    ``in_hook``: called from inside a forward hook, so nothing may be read back to the host (a
    functional PReLU's region then stays a tensor on the weight's device).
    """
    check_delta(delta)
    if spec.kind is ActivationKind.PRELU:
        return _prelu_region(spec, delta, in_hook)
    if spec.custom is not None:  # a user's function: not kept in a process-wide cache
        return _derive(spec, delta)
    return _derived_region(spec, delta)


# --- recognising modules -------------------------------------------------------------------------

_MODULE_KINDS: tuple[tuple[type[nn.Module], ActivationKind], ...] = (
    (nn.ReLU6, ActivationKind.RELU6),  # before Hardtanh: ReLU6 subclasses it
    (nn.ReLU, ActivationKind.RELU),
    (nn.LeakyReLU, ActivationKind.LEAKY_RELU),
    (nn.RReLU, ActivationKind.RRELU),
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
    (nn.Hardsigmoid, ActivationKind.HARDSIGMOID),
    (nn.LogSigmoid, ActivationKind.LOGSIGMOID),
    (nn.Tanh, ActivationKind.TANH),
    (nn.Hardtanh, ActivationKind.HARDTANH),
    (nn.Softsign, ActivationKind.SOFTSIGN),
    (nn.Threshold, ActivationKind.THRESHOLD),
    (nn.Hardshrink, ActivationKind.HARDSHRINK),
    (nn.Softshrink, ActivationKind.SOFTSHRINK),
    (nn.Tanhshrink, ActivationKind.TANHSHRINK),
)

_MODULE_PARAMS: dict[ActivationKind, tuple[str, ...]] = {
    ActivationKind.LEAKY_RELU: ("negative_slope",),
    ActivationKind.RRELU: ("lower", "upper"),
    ActivationKind.ELU: ("alpha",),
    ActivationKind.CELU: ("alpha",),
    ActivationKind.GELU: ("approximate",),
    ActivationKind.SOFTPLUS: ("beta", "threshold"),
    ActivationKind.HARDTANH: ("min_val", "max_val"),
    ActivationKind.THRESHOLD: ("threshold", "value"),
    ActivationKind.HARDSHRINK: ("lambd",),
    ActivationKind.SOFTSHRINK: ("lambd",),
}


def _module_params(m: nn.Module, kind: ActivationKind) -> tuple[tuple[str, Any], ...]:
    return tuple((n, getattr(m, n)) for n in _MODULE_PARAMS.get(kind, ()))


def spec_for_module(m: nn.Module) -> ActivationSpec | None:
    """The built-in activation a module computes, or None if it is not one (a registry adds the
    user's kinds: `deadneuron.registry.ActivationRegistry.spec_for_module`). A subclass that overrides
    ``forward`` computes something else (``relu(x - 1)``): it is no built-in kind, and the functions its
    forward calls are measured instead, on their own inputs."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            weight = m.weight if isinstance(m, nn.PReLU) else None
            return ActivationSpec(kind, _module_params(m, kind), prelu_weight=weight)
    return None


def is_inplace(m: nn.Module) -> bool:
    return bool(getattr(m, "inplace", False))
