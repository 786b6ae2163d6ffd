"""Mergeable streaming per-channel activation statistics (no hooks, no I/O).

`ChannelStats` holds, per channel, the counts and moments of DESIGN section 3:

    n          elements seen
    zero       elements with |a| <= eps
    flat       elements whose pre-activation z lay in the activation's flat region
    nonfinite  NaN or Inf elements of a
    sum, sumsq moments of the finite elements of a
    min, max   range of the finite elements of a

State lives on the device of the first tensor it sees and is only ever updated in place (by torch
ops, or on CPU by the C kernel of `deadneuron._native` writing into the same tensor), so an update
never synchronises with the host. Memory is O(channels). `merge` adds counts and combines ranges, so
accumulators from several processes or data shards reduce exactly. `fused_moments` is the torch
reference every kernel is tested against.

`batch_stats` is the one-shot functional twin used by tests as the oracle's building block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

_INF = float("inf")
_NAN = float("nan")  # as a flat threshold: every comparison false, nothing counted


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
    if a3.shape[0] == 0 or a3.shape[2] == 0:  # an empty batch: nothing seen (amin/amax would raise)
        z = torch.zeros(a3.shape[1], dtype=torch.float64, device=a3.device)
        return z, z.clone(), z.clone(), z.clone(), z.clone(), z + _INF, z - _INF
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
    """The statistics kernels: the C kernel on CPU, else `torch.compile`, else eager torch.

    All three compute `fused_moments`. On CPU the C kernel (`deadneuron._native`, built once with the
    system compiler) does the whole update in one pass and one ctypes call; where it cannot be built
    or loaded, a `torch.compile`d `fused_moments` fuses the pass (its call costs about 0.5 ms of
    guards on CPU, so tensors under ``min_compiled_numel`` elements stay eager); any failure to compile
    falls back to eager for the rest of the run. ``name`` and ``fallback_reason`` say which ran and why.
    On CUDA the eager kernels are used: measured on an H100, the compiled call's fixed cost exceeded
    the whole eager cost for every benchmark model (benchmarks/overhead.py).

    ``compile=False`` forces the eager torch kernels (the reference).
    """

    def __init__(self, compile: bool = True, *, min_compiled_numel: int = 1 << 15) -> None:
        self.compiled = compile
        self.min_compiled_numel = min_compiled_numel
        self.fallback_reason: str | None = None
        self.native: Any = None
        self._moments: Callable[..., Any] = fused_moments
        self._flat: Callable[..., Any] = fused_flat
        self._used: set[str] = set()
        if compile:
            from deadneuron import _native

            self.native = _native.load()
            if self.native is None:
                self.fallback_reason = _native.load_error()
                self._moments, self._flat = _compiled_kernels()
            else:
                self.compiled = False  # what the C kernel does not take (CUDA tensors) runs eager

    @property
    def name(self) -> str:
        """Which kernels ran ("native", "compiled", "eager", or several joined by "+")."""
        order = ("native", "compiled", "eager")
        used = [k for k in order if k in self._used]
        if used:
            return "+".join(used)
        return "native" if self.native is not None else "compiled" if self.compiled else "eager"

    def _call(self, fast: Callable[..., Any], eager: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
        if self.compiled and x.device.type == "cpu" and x.numel() >= self.min_compiled_numel:
            try:
                # the Recorder's TorchFunctionMode must not be traced into the compiled graph
                with torch._C.DisableTorchFunction():
                    out = fast(x, *args)
                self._used.add("compiled")
                return out
            except Exception as exc:  # no C++ compiler, unsupported device, dynamo limits...
                self.compiled = False
                first = (str(exc).strip().splitlines() or [""])[0]
                self.fallback_reason = f"{type(exc).__name__}: {first}"
        self._used.add("eager")
        return eager(x, *args)

    def accumulate(
        self,
        a3: torch.Tensor,
        f3: torch.Tensor | None,
        eps: float,
        lo: float,
        hi: float,
        count_flat: bool,
        acc: torch.Tensor,
        counts: torch.Tensor,
    ) -> bool:
        """Add the batch into ``acc``/``counts`` with the C kernel where it applies; False if it does not."""
        native = self.native
        if native is None:
            return False
        a3, f3 = _float(a3), None if f3 is None else _float(f3)
        if not native.supports(a3, f3):
            return False
        native.update(a3, f3, eps, lo, hi, count_flat, acc, counts)
        self._used.add("native")
        return True

    def moments(
        self, a3: torch.Tensor, eps: float, lo: float, hi: float, f3: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        a3 = _float(a3)
        return self._call(self._moments, fused_moments, a3, a3 if f3 is None else _float(f3), eps, lo, hi)

    def flat(self, z3: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        z3 = _float(z3)
        native = self.native
        if native is not None and native.supports(z3, None):
            acc = torch.zeros(7, z3.shape[1], dtype=torch.float64)
            native.update(z3, None, 0.0, lo, hi, True, acc, torch.zeros(2, dtype=torch.float64))
            self._used.add("native")
            return acc[1]
        return self._call(self._flat, fused_flat, z3, lo, hi)


@functools.cache
def _compiled_kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """`torch.compile` wrappers, made once per process (making one costs milliseconds)."""
    return torch.compile(fused_moments, dynamic=True), torch.compile(fused_flat, dynamic=True)


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
    """Host-side result of `ChannelStats.compute`: plain lists, and the same values as float64 numpy
    arrays in ``arrays`` (keys as the fields) for code that computes with them."""

    n: int
    zero: list[int]
    flat: list[int]
    nonfinite: list[int]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    arrays: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


class ChannelStats:
    """Streaming per-channel accumulator with declared, mergeable state.

    Counts are held as float64 tensors (exact up to 2**53 elements) so that kernels can add them
    without integer casts; `compute` returns ints.
    """

    _ROWS = ("zero", "flat", "nonfinite", "sum", "sumsq", "min", "max")

    def __init__(self, channels: int, device: torch.device | str | None = None, *, kernels: Kernels | None = None) -> None:
        self.channels = channels
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kernels = kernels or _EAGER
        self.reset()

    # State: one (7, C) float64 tensor (rows as in _ROWS; the C kernel adds into it in place) and
    # `counts` = (n, flat_n): the elements seen, and those whose flat region was tested.
    def reset(self) -> None:
        self.acc = torch.zeros(7, self.channels, dtype=torch.float64, device=self.device)
        self.acc[5] = _INF
        self.acc[6] = -_INF
        self.counts = torch.zeros(2, dtype=torch.float64, device=self.device)

    n = property(lambda self: self.counts[0], doc="elements seen per channel (0-d float64 tensor)")
    flat_n = property(lambda self: self.counts[1], doc="elements whose flat region was tested")
    zero = property(lambda self: self.acc[0])
    flat = property(lambda self: self.acc[1])
    nonfinite = property(lambda self: self.acc[2])
    sum = property(lambda self: self.acc[3])
    sumsq = property(lambda self: self.acc[4])
    min = property(lambda self: self.acc[5])
    max = property(lambda self: self.acc[6])

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.acc, self.counts))

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            self.acc, self.counts = self.acc.to(device), self.counts.to(device)
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
        if self.kernels.accumulate(
            a3, z3, eps, lo if flat is not None else _NAN, hi if flat is not None else _NAN, flat is not None,
            self.acc, self.counts,
        ):
            return
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
        other_acc, other_counts = other.acc.to(self.device), other.counts.to(self.device)
        out.counts = self.counts + other_counts
        out.acc = torch.cat([self.acc[:5] + other_acc[:5], torch.minimum(self.min, other_acc[5])[None],
                             torch.maximum(self.max, other_acc[6])[None]])
        return out

    def compute(self) -> ChannelSummary:
        """Synchronise once (one copy of the state to the host) and return host values. Moments are
        over finite elements only; a channel with no finite element has NaN moments and range."""
        import numpy as np

        acc = self.acc.detach().cpu().numpy()
        n = int(self.counts[0].item())
        zero, flat, nonfinite, total, sumsq, mn, mx = acc
        finite = n - nonfinite
        seen = finite > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(seen, total / np.maximum(finite, 1), np.nan)
            var = np.maximum(sumsq / np.maximum(finite, 1) - mean * mean, 0.0)
        arrays = {
            "zero": np.rint(zero), "flat": np.rint(flat), "nonfinite": np.rint(nonfinite), "mean": mean,
            "std": np.where(seen, np.sqrt(var), np.nan), "min": np.where(seen, mn, np.nan),
            "max": np.where(seen, mx, np.nan),
        }
        ints = lambda v: v.astype(np.int64).tolist()  # noqa: E731
        return ChannelSummary(
            n=n,
            zero=ints(arrays["zero"]),
            flat=ints(arrays["flat"]),
            nonfinite=ints(arrays["nonfinite"]),
            mean=arrays["mean"].tolist(),
            std=arrays["std"].tolist(),
            min=arrays["min"].tolist(),
            max=arrays["max"].tolist(),
            arrays=arrays,
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
