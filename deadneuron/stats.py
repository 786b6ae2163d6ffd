"""Mergeable streaming per-channel activation statistics (pure torch: no hooks, no I/O).

`ChannelStats` holds, per channel, the counts and moments of DESIGN section 3:

    n          elements seen
    zero       elements with |a| <= eps
    flat       elements whose pre-activation z lay in the activation's flat region
    nonfinite  NaN or Inf elements of a
    sum, sumsq moments of the finite elements of a
    min, max   range of the finite elements of a

State lives on the device of the first tensor it sees and is only ever updated with in-place tensor
ops, so an update never synchronises with the host. Memory is O(channels). `merge` adds counts and
combines ranges, so accumulators from several processes or data shards reduce exactly.

`batch_stats` is the one-shot functional twin used by tests as the oracle's building block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_INF = float("inf")


def channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as (outer, C, inner) without copying where possible; axis is the channel dimension."""
    if x.dim() == 0:
        return x.reshape(1, 1, 1)
    axis = axis % x.dim()
    c = x.shape[axis]
    if axis == x.dim() - 1:
        return x.reshape(-1, c, 1)
    return x.reshape(int(torch.Size(x.shape[:axis]).numel()), c, -1)


def fused_moments(
    a3: torch.Tensor, f3: torch.Tensor, eps: float, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (zero, flat, nonfinite, sum, sumsq, min, max) of an (outer, C, inner) view.

    ``flat`` counts elements of ``f3`` (the pre-activation z, or ``a3`` itself where the flat region
    can be read on the output) in (-inf, lo] or [hi, inf). Written as one expression graph
    so that `torch.compile` fuses it into a single pass; eager it is still correct. Reductions go
    over the innermost dimension first (several times faster on CPU than reducing (0, 2) at once);
    counts are summed as floats (exact below 2**24 per row) then in float64 across rows. Moments and
    the range cover finite elements only.
    """
    finite = torch.isfinite(a3)
    clean = torch.where(finite, a3, 0.0)
    zero = (a3.abs() <= eps).to(a3.dtype).sum(2).double().sum(0)
    flat = ((f3 <= lo) | (f3 >= hi)).to(f3.dtype).sum(2).double().sum(0)
    nonfinite = (~finite).to(a3.dtype).sum(2).double().sum(0)
    total = clean.sum(2).double().sum(0)
    sumsq = (clean * clean).sum(2).double().sum(0)
    mn = torch.where(finite, a3, float("inf")).amin(2).amin(0).double()
    mx = torch.where(finite, a3, float("-inf")).amax(2).amax(0).double()
    return zero, flat, nonfinite, total, sumsq, mn, mx


def fused_flat(z3: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-channel count of elements of an (outer, C, inner) view in (-inf, lo] or [hi, inf)."""
    return ((z3 <= lo) | (z3 >= hi)).to(z3.dtype).sum(2).double().sum(0)


class Kernels:
    """The statistics kernels, compiled with `torch.compile` where that works, eager otherwise.

    A compiled kernel does in one fused pass what eager PyTorch does in about eight; the first call
    compiles (seconds, cached by PyTorch across processes). Any failure to compile falls back to the
    eager kernels for the rest of the run, with ``fallback_reason`` saying why.

    The compiled call has a fixed cost of about 0.5 ms on CPU (guards, wrappers), more than the eager
    kernels spend on a small tensor, so tensors under ``min_compiled_numel`` elements take the eager
    path. On CUDA the eager kernels are used: measured on an H100, the compiled call's fixed cost
    exceeded the whole eager cost for every benchmark model (benchmarks/overhead.py).
    """

    def __init__(self, compile: bool = True, *, min_compiled_numel: int = 1 << 15) -> None:
        self.compiled = compile
        self.min_compiled_numel = min_compiled_numel
        self.fallback_reason: str | None = None
        self._moments: Callable[..., Any] = fused_moments
        self._flat: Callable[..., Any] = fused_flat
        if compile:
            self._moments = torch.compile(fused_moments, dynamic=True)
            self._flat = torch.compile(fused_flat, dynamic=True)

    def _call(self, fast: Callable[..., Any], eager: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
        if self.compiled and x.device.type == "cpu" and x.numel() >= self.min_compiled_numel:
            try:
                # the Recorder's TorchFunctionMode must not be traced into the compiled graph
                with torch._C.DisableTorchFunction():
                    return fast(x, *args)
            except Exception as exc:  # no C++ compiler, unsupported device, dynamo limits...
                self.compiled = False
                first = (str(exc).strip().splitlines() or [""])[0]
                self.fallback_reason = f"{type(exc).__name__}: {first}"
        return eager(x, *args)

    def moments(
        self, a3: torch.Tensor, eps: float, lo: float, hi: float, f3: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        a3 = _float(a3)
        return self._call(self._moments, fused_moments, a3, a3 if f3 is None else _float(f3), eps, lo, hi)

    def flat(self, z3: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return self._call(self._flat, fused_flat, _float(z3), lo, hi)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def count_flat(z3: torch.Tensor, lo: torch.Tensor | float, hi: float, kernels: Kernels | None = None) -> torch.Tensor:
    """Per-channel flat count; ``lo`` may be a per-channel (C,) tensor (PReLU, one slope per channel)."""
    if isinstance(lo, torch.Tensor):
        lo_b = lo.to(z3.device, z3.dtype).view(1, -1, 1)
        return ((z3 <= lo_b) | (z3 >= hi)).to(z3.dtype).sum(2).double().sum(0)
    if lo == -_INF and hi == _INF:
        return torch.zeros(z3.shape[1], dtype=torch.float64, device=z3.device)
    return (kernels or _EAGER).flat(z3, lo, hi)


_EAGER = Kernels(compile=False)  # stateless: the eager kernels need no compilation or cache


@dataclass(frozen=True)
class ChannelSummary:
    """Host-side result of `ChannelStats.compute` (numpy-free lists keep the core dependency-light)."""

    n: int
    zero: list[int]
    flat: list[int]
    nonfinite: list[int]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]


class ChannelStats:
    """Streaming per-channel accumulator with declared, mergeable state.

    Counts are held as float64 tensors (exact up to 2**53 elements) so that kernels can add them
    without integer casts; `compute` returns ints.
    """

    _STATE = ("n", "flat_n", "zero", "flat", "nonfinite", "sum", "sumsq", "min", "max")

    def __init__(self, channels: int, device: torch.device | str | None = None, *, kernels: Kernels | None = None) -> None:
        self.channels = channels
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kernels = kernels or _EAGER
        self.reset()

    def reset(self) -> None:
        c, dev, f64 = self.channels, self.device, torch.float64
        self.n = torch.zeros((), dtype=f64, device=dev)
        self.flat_n = torch.zeros((), dtype=f64, device=dev)
        self.zero = torch.zeros(c, dtype=f64, device=dev)
        self.flat = torch.zeros(c, dtype=f64, device=dev)
        self.nonfinite = torch.zeros(c, dtype=f64, device=dev)
        self.sum = torch.zeros(c, dtype=f64, device=dev)
        self.sumsq = torch.zeros(c, dtype=f64, device=dev)
        self.min = torch.full((c,), _INF, dtype=f64, device=dev)
        self.max = torch.full((c,), -_INF, dtype=f64, device=dev)

    def state_bytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._STATE)

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            for name in self._STATE:
                setattr(self, name, getattr(self, name).to(device))
            self.device = device

    def _check(self, x3: torch.Tensor, what: str) -> None:
        if x3.dim() != 3 or x3.shape[1] != self.channels:
            raise ValueError(
                f"{what} of shape {tuple(x3.shape)} is not an (outer, {self.channels}, inner) view for this accumulator"
            )

    def update_output(
        self,
        a3: torch.Tensor,
        eps: float = 0.0,
        *,
        flat: tuple[float, float] | None = None,
        z3: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of activations viewed as (outer, C, inner). ``flat=(lo, hi)`` also counts the
        flat region in the same pass: on ``z3`` when given, else on the output itself (for
        activations where that is exact)."""
        self._check(a3, "activation")
        self._to(a3.device)
        lo, hi = flat if flat is not None else (-_INF, _INF)
        if z3 is not None and z3.shape != a3.shape:
            raise ValueError(f"pre-activation {tuple(z3.shape)} and activation {tuple(a3.shape)} differ in shape")
        zero, flat_count, nonfinite, total, sumsq, mn, mx = self.kernels.moments(a3, eps, lo, hi, z3)
        elements = a3.shape[0] * a3.shape[2]
        self.n.add_(elements)
        self.zero.add_(zero)
        self.nonfinite.add_(nonfinite)
        self.sum.add_(total)
        self.sumsq.add_(sumsq)
        torch.minimum(self.min, mn, out=self.min)
        torch.maximum(self.max, mx, out=self.max)
        if flat is not None:
            self.flat_n.add_(elements)
            self.flat.add_(flat_count)

    def update_flat(self, z3: torch.Tensor, lo: torch.Tensor | float, hi: float) -> None:
        """Add a batch of pre-activations viewed as (outer, C, inner): flat-region counts only."""
        self._check(z3, "pre-activation")
        self._to(z3.device)
        self.flat_n.add_(z3.shape[0] * z3.shape[2])
        self.flat.add_(count_flat(z3, lo, hi, self.kernels))

    def update(self, z3: torch.Tensor, a3: torch.Tensor, *, lo: torch.Tensor | float, hi: float, eps: float) -> None:
        if isinstance(lo, torch.Tensor):
            self.update_flat(z3, lo, hi)
            self.update_output(a3, eps)
        else:
            self.update_output(a3, eps, flat=(lo, hi), z3=z3)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """A new accumulator equal to one that had seen both streams."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        out = ChannelStats(self.channels, self.device, kernels=self.kernels)
        dev = self.device
        for name in ("n", "flat_n", "zero", "flat", "nonfinite", "sum", "sumsq"):
            setattr(out, name, getattr(self, name) + getattr(other, name).to(dev))
        out.min = torch.minimum(self.min, other.min.to(dev))
        out.max = torch.maximum(self.max, other.max.to(dev))
        return out

    def compute(self) -> ChannelSummary:
        """Synchronise once and return host values. Moments are over finite elements only."""
        n = int(self.n.item())
        finite = (self.n - self.nonfinite).clamp_min(1)
        mean = self.sum / finite
        var = (self.sumsq / finite - mean.square()).clamp_min(0)
        seen = (self.n - self.nonfinite) > 0
        nan = torch.full_like(mean, float("nan"))
        ints = lambda t: [int(v) for v in t.round().cpu().tolist()]  # noqa: E731
        return ChannelSummary(
            n=n,
            zero=ints(self.zero),
            flat=ints(self.flat),
            nonfinite=ints(self.nonfinite),
            mean=torch.where(seen, mean, nan).cpu().tolist(),
            std=torch.where(seen, var.sqrt(), nan).cpu().tolist(),
            min=torch.where(seen, self.min, nan).cpu().tolist(),
            max=torch.where(seen, self.max, nan).cpu().tolist(),
        )


def batch_stats(
    z3: torch.Tensor, a3: torch.Tensor, *, lo: torch.Tensor | float, hi: float, eps: float
) -> ChannelSummary:
    """One-shot statistics of a single (outer, C, inner) batch: the functional twin."""
    s = ChannelStats(a3.shape[1], a3.device)
    s.update(z3, a3, lo=lo, hi=hi, eps=eps)
    return s.compute()


def _histogram_edges() -> tuple[float, ...]:
    """Signed logarithmic bin edges, 4 bins per decade from 1e-4 to 1e4 on each side, plus a bin that
    holds exact zeros: (-1e-30, 0]. Fixed and data-independent, so histograms of batches, processes
    and runs add up."""
    pos = tuple(10.0 ** (k / 4) for k in range(-16, 17))
    return (*(-p for p in reversed(pos)), -1e-30, 0.0, *pos)


HISTOGRAM_EDGES = _histogram_edges()


class ValueHistogram:
    """Streaming histogram of finite activation values over `HISTOGRAM_EDGES` (len(edges) + 1 bins:
    bin 0 is (-inf, e0], bin i is (e[i-1], e[i]], the last is (e[-1], inf)). Stays on the device.

    Binning every element of a large activation costs more than the rest of the audit, so each
    update bins a deterministic strided sample of at most ``sample`` elements (every k-th element,
    k odd so that it does not lock onto a power-of-two channel or spatial stride). The counts are of
    that sample; ``sampled`` says whether any update was thinned.
    """

    def __init__(self, device: torch.device | str | None = None, *, sample: int = 1 << 16) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bins = len(HISTOGRAM_EDGES) + 1
        self.sample = sample
        self.sampled = False
        self.reset()

    def reset(self) -> None:
        self.edges = torch.tensor(HISTOGRAM_EDGES, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(self.bins, dtype=torch.int64, device=self.device)

    def update(self, a: torch.Tensor) -> None:
        if a.device != self.device:
            self.device = a.device
            self.edges, self.counts = self.edges.to(a.device), self.counts.to(a.device)
        flat = _float(a).reshape(-1)
        if flat.numel() > self.sample:
            step = -(-flat.numel() // self.sample) | 1
            flat = flat[::step].contiguous()
            self.sampled = True
        index = torch.bucketize(flat, self.edges)
        index = torch.where(torch.isfinite(flat), index, self.bins)  # non-finite: an extra, dropped bin
        self.counts.add_(torch.bincount(index, minlength=self.bins + 1)[: self.bins])

    def merge(self, other: ValueHistogram) -> ValueHistogram:
        out = ValueHistogram(self.device)
        out.counts = self.counts + other.counts.to(self.device)
        return out

    def compute(self) -> list[int]:
        return [int(c) for c in self.counts.cpu().tolist()]
