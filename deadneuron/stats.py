"""Mergeable streaming per-channel activation statistics (pure accumulators: no hooks, no I/O).

`ChannelStats` holds, per channel, the counts and moments of DESIGN section 3:

    n          elements seen (one count for every channel)
    zero       elements with |a| <= eps
    flat       elements whose pre-activation z was finite and lay in the activation's flat region
    nonfinite  NaN or Inf elements of a (n minus the finite ones)
    mean, m2   mean and centred sum of squares of the finite elements of a, in float64
    min, max   range of the finite elements of a

State lives on the device of the first tensor it sees and is only ever updated in place (by torch
ops, or on CPU by the C kernel of `deadneuron._native` writing into the same tensor), so an update
never synchronises with the host. Memory is O(channels). Each batch's moments are merged in with
Chan's parallel formula, and so are two accumulators in `merge`, so accumulators from several
processes or data shards reduce to what one accumulator over all the data would hold. Which kernel
computes a batch is `deadneuron.kernels.Kernels`' choice; the torch reference is
`deadneuron.moments.fused_moments`.

`batch_stats` is the one-shot functional form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deadneuron._native import Planned
from deadneuron.kernels import Kernels, as_float
from deadneuron.moments import merge_moments_

__all__ = [
    "HISTOGRAM_EDGES", "ChannelStats", "ChannelSummary", "Kernels", "ValueHistogram", "batch_stats", "channel_view",
    "summary_of",
]

_INF = float("inf")
_NAN = float("nan")  # as a flat threshold: every comparison false, nothing counted
ROWS = ("zero", "flat", "finite", "mean", "m2", "min", "max")  # the rows of `ChannelStats.acc`
_MAX_PLANS = 16  # prepared kernel calls kept per accumulator (one per layout seen)


def channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as (outer, C, inner) without copying where possible; axis is the channel dimension."""
    if x.dim() == 0:
        return x.reshape(1, 1, 1)
    axis = axis % x.dim()
    c = x.shape[axis]
    outer = int(torch.Size(x.shape[:axis]).numel())
    # every size given: a -1 is ambiguous where the tensor holds no element (a batch of 0, a width of 0)
    return x.reshape(outer, c, int(torch.Size(x.shape[axis + 1 :]).numel()))


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

    State: ``acc``, one (7, C) float64 tensor with the rows of `ROWS` (the C kernel merges into it in
    place), and ``counts`` = (n, flat_n): the elements seen, and those whose flat region was tested.
    Counts are float64 (exact up to 2**53 elements) so that kernels add them without integer casts;
    `compute` returns ints.
    """

    def __init__(self, channels: int, device: torch.device | str | None = None, *, kernels: Kernels | None = None) -> None:
        self.channels = channels
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kernels = kernels or Kernels(compile=False)
        self.reset()

    def reset(self) -> None:
        self.acc = torch.zeros(len(ROWS), self.channels, dtype=torch.float64, device=self.device)
        self.acc[5] = _INF
        self.acc[6] = -_INF
        self.counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._plans: dict[tuple[Any, ...], Planned | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "_plans"}  # prepared calls hold raw pointers

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._plans = {}

    n = property(lambda self: self.counts[0], doc="elements seen per channel (0-d float64 tensor)")
    flat_n = property(lambda self: self.counts[1], doc="elements whose flat region was tested")
    zero = property(lambda self: self.acc[0])
    flat = property(lambda self: self.acc[1])
    finite = property(lambda self: self.acc[2])
    mean = property(lambda self: self.acc[3])
    m2 = property(lambda self: self.acc[4])
    min = property(lambda self: self.acc[5])
    max = property(lambda self: self.acc[6])
    nonfinite = property(lambda self: self.counts[0] - self.acc[2], doc="non-finite elements (a new tensor)")
    sum = property(lambda self: self.acc[3] * self.acc[2], doc="sum of the finite elements (a new tensor)")

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
        if z3 is not None and z3.shape != a3.shape:
            raise ValueError(f"pre-activation {tuple(z3.shape)} and activation {tuple(a3.shape)} differ in shape")
        lo, hi = flat if flat is not None else (_NAN, _NAN)
        if self.kernels.accumulate(a3, z3, eps, lo, hi, flat is not None, self.acc, self.counts):
            return
        zero, flat_count, finite, mean, m2, mn, mx = self.kernels.moments(a3, eps, lo, hi, z3)
        elements = a3.shape[0] * a3.shape[2]
        self.n.add_(elements)
        self.zero.add_(zero)
        merge_moments_(self.finite, self.mean, self.m2, finite, mean, m2)
        torch.minimum(self.min, mn, out=self.min)
        torch.maximum(self.max, mx, out=self.max)
        if flat is not None:
            self.flat_n.add_(elements)
            self.flat.add_(flat_count)

    def update_output_along(
        self, a: torch.Tensor, axis: int, eps: float = 0.0, *, flat: tuple[float, float] | None = None,
        z: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """`update_output` of ``channel_view(a, axis)`` (and of ``z``'s view): the same values. On CPU the
        C kernel's call is prepared once per layout of ``a`` (`_planned`), so that a call builds no view,
        checks nothing twice and allocates nothing."""
        if type(a) is torch.Tensor and (z is None or type(z) is torch.Tensor):
            zkey = None if z is None else (z.shape, z.stride(), z.dtype, z.is_cpu)
            key = (a.shape, a.stride(), a.dtype, a.is_cpu, axis, eps, flat, zkey)
            run = self._lookup(key, a, axis, eps, flat, z)
            if run is not None and run(a.data_ptr(), None if z is None else z.data_ptr()) == 0:
                return
            self._plans[key] = None  # strides no kernel reads: the general path copies them
        z3 = None if z is None else channel_view(z.detach(), axis)
        self.update_output(channel_view(a.detach(), axis), eps, flat=flat, z3=z3)

    def update_output_rows(
        self, a3: torch.Tensor, rows: torch.Tensor, eps: float = 0.0, *, flat: tuple[float, float] | None = None,
        z3: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """`update_output` of ``a3.index_select(0, rows)`` (and of ``z3``'s): the same values. On CPU the C
        kernel reads those outer rows of ``a3`` in place (a padding mask's valid rows), without the copy."""
        if rows.is_cpu and type(a3) is torch.Tensor and (z3 is None or type(z3) is torch.Tensor):
            zkey = None if z3 is None else (z3.shape, z3.stride(), z3.dtype, z3.is_cpu)
            key = (a3.shape, a3.stride(), a3.dtype, a3.is_cpu, "rows", eps, flat, zkey)
            run = self._lookup(key, a3, 1, eps, flat, z3)
            if run is not None:
                offsets = (rows.to(torch.int64) * a3.stride(0)).contiguous()
                if run.rows(a3.data_ptr(), None if z3 is None else z3.data_ptr(), offsets) == 0:
                    return
                self._plans[key] = None
        z3 = None if z3 is None else z3.detach().index_select(0, rows)
        self.update_output(a3.detach().index_select(0, rows), eps, flat=flat, z3=z3)

    def update_relu_along(self, z: torch.Tensor, axis: int, eps: float, flat: tuple[float, float],
                          out: torch.Tensor | None = None) -> bool:  # fmt: skip
        """`update_output_along` of ``torch.relu(z)`` with the flat region ``flat`` tested on ``z``, in one
        read of ``z`` by the C kernel (no output read, no second tensor): True where it ran; False where
        the kernel does not take ``z`` (then nothing was added: the caller measures the output). With
        ``out`` (a tensor of z's strides, not z) the same pass writes ``torch.relu(z)`` into it, under relu's
        default thresholds only: True where it did both, else False with nothing done (`_stats.c` WRITES)."""
        if type(z) is not torch.Tensor:
            return False
        key = (z.shape, z.stride(), z.dtype, z.is_cpu, axis, eps, flat, "relu")
        run = self._lookup(key, z, axis, eps, flat, None, relu=True)
        if run is not None and run(z.data_ptr(), None if out is None else out.data_ptr()) == 0:
            return True
        if out is None:
            self._plans[key] = None  # strides no kernel reads: the caller's general path
        return False

    def update_relu_rows(self, z3: torch.Tensor, rows: torch.Tensor, eps: float, flat: tuple[float, float]) -> bool:
        """`update_relu_along` of ``z3.index_select(0, rows)`` (an (outer, C, inner) view), the valid rows read
        in place by the C kernel as `update_output_rows` reads them: True where it ran, else nothing added."""
        if not rows.is_cpu or type(z3) is not torch.Tensor:
            return False
        key = (z3.shape, z3.stride(), z3.dtype, z3.is_cpu, "relu-rows", eps, flat)
        run = self._lookup(key, z3, 1, eps, flat, None, relu=True)
        if run is not None and run.rows(z3.data_ptr(), None, (rows.to(torch.int64) * z3.stride(0)).contiguous()) == 0:
            return True
        self._plans[key] = None
        return False

    def update_flat_along(self, z: torch.Tensor, axis: int, lo: float, hi: float) -> None:
        """`update_flat` of ``channel_view(z, axis)`` with scalar thresholds, prepared as `update_output_along`."""
        if type(z) is torch.Tensor:
            key = (z.shape, z.stride(), z.dtype, z.is_cpu, axis, lo, hi, "flat")
            run = self._lookup(key, z, axis, 0.0, (lo, hi), None, flat_only=True)
            if run is not None and run(z.data_ptr(), None) == 0:
                return
        self.update_flat(channel_view(z.detach(), axis), lo, hi)

    def _lookup(
        self, key: tuple[Any, ...], a: torch.Tensor, axis: int, eps: float, flat: tuple[float, float] | None,
        z: torch.Tensor | None, *, flat_only: bool = False, relu: bool = False,
    ) -> Planned | None:  # fmt: skip
        """The call cached under ``key`` (None: the general path), prepared again where the accumulator
        tensors it writes were replaced (`reset`, a device move, state assigned from elsewhere)."""
        run = self._plans.get(key)
        if run is None and key in self._plans:
            return None
        if run is None or run.acc is not self.acc or run.counts is not self.counts:
            run = self._planned(key, a, axis, eps, flat, z, flat_only=flat_only, relu=relu)
        return run

    def _planned(
        self, key: tuple[Any, ...], a: torch.Tensor, axis: int, eps: float, flat: tuple[float, float] | None,
        z: torch.Tensor | None, *, flat_only: bool = False, relu: bool = False,
    ) -> Planned | None:  # fmt: skip
        """The C kernel's call for tensors laid out as ``a`` (and ``z``), cached under ``key``; None (also
        cached) where the general path must run: not the kernel's device or dtype, an accumulator
        elsewhere, a view that would copy, ``z`` laid out otherwise, or nothing to read."""
        if len(self._plans) >= _MAX_PLANS:  # layouts that keep changing (varying shapes): keep a few
            self._plans.clear()
        run = None
        a3 = channel_view(a, axis) if a.is_cpu and self.device.type == "cpu" and a.numel() else None
        z3 = None if z is None or a3 is None else channel_view(z, axis)
        if a3 is not None and a3.data_ptr() == a.data_ptr() and (
            z is None or (z3 is not None and z3.data_ptr() == z.data_ptr() and z3.shape == a3.shape
                          and z3.stride() == a3.stride() and z3.dtype == a3.dtype and z.is_cpu)
        ):  # fmt: skip
            self._check(a3, "pre-activation" if flat_only else "activation")
            lo, hi = flat if flat is not None else (_NAN, _NAN)
            run = self.kernels.plan(a3, eps, lo, hi, flat is not None, self.acc, self.counts, flat_only=flat_only,
                                    relu=relu)  # fmt: skip
        self._plans[key] = run
        return run

    def update_flat(self, z3: torch.Tensor, lo: torch.Tensor | float, hi: float) -> None:
        """Add a batch of pre-activations viewed as (outer, C, inner): flat-region counts only."""
        self._check(z3, "pre-activation")
        self._to(z3.device)
        self.flat_n.add_(z3.shape[0] * z3.shape[2])
        self.flat.add_(self.kernels.count_flat(z3, lo, hi))

    def update(self, z3: torch.Tensor, a3: torch.Tensor, *, lo: torch.Tensor | float, hi: float, eps: float) -> None:
        if isinstance(lo, torch.Tensor):
            self.update_flat(z3, lo, hi)
            self.update_output(a3, eps)
        else:
            self.update_output(a3, eps, flat=(lo, hi), z3=z3)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """A new accumulator equal to one that had seen both streams (Chan's formula for the moments)."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        out = ChannelStats(self.channels, self.device, kernels=self.kernels)
        theirs = other.acc.to(self.device)
        acc = self.acc.clone()
        acc[:2] += theirs[:2]
        merge_moments_(acc[2], acc[3], acc[4], theirs[2], theirs[3], theirs[4])
        torch.minimum(acc[5], theirs[5], out=acc[5])
        torch.maximum(acc[6], theirs[6], out=acc[6])
        out.acc, out.counts = acc, self.counts + other.counts.to(self.device)
        return out

    def state(self) -> torch.Tensor:
        """The whole state as one flat float64 tensor on its device (``counts``, then the rows of ``acc``):
        what `compute` copies to the host, and `summary_of` reads back."""
        return torch.cat([self.counts, self.acc.reshape(-1)])

    def compute(self) -> ChannelSummary:
        """Synchronise once (one copy of the state to the host) and return host values: `summary_of`."""
        return summary_of(self.state().detach().cpu().numpy(), self.channels)


def summary_of(host: Any, channels: int) -> ChannelSummary:
    """Host values of a `ChannelStats.state` copied to the host (a float64 numpy array). Moments are over
    finite elements only (std: population, ddof 0); a channel with no finite element has NaN moments and
    range."""
    import numpy as np

    n = int(host[0])
    zero, flat, finite, mean, m2, mn, mx = host[2:].reshape(len(ROWS), channels)
    seen = finite > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.maximum(m2, 0.0) / np.maximum(finite, 1.0))
    arrays = {
        "zero": np.rint(zero), "flat": np.rint(flat), "nonfinite": np.rint(n - finite),
        "mean": np.where(seen, mean, np.nan), "std": np.where(seen, std, np.nan),
        "min": np.where(seen, mn, np.nan), "max": np.where(seen, mx, np.nan),
    }

    def ints(counts: np.ndarray[Any, Any]) -> list[int]:
        return list(counts.astype(np.int64).tolist())

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
    """One-shot statistics of a single (outer, C, inner) batch: the functional form."""
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
    bin 0 is (-inf, e0], bin i is (e[i-1], e[i]], the last is (e[-1], inf)). Stays on the device and
    never synchronises with it: counts are added with a fixed-size `index_add_` (non-finite values
    go to one extra bin that `compute` leaves out).

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
        self.counts = torch.zeros(self.bins + 1, dtype=torch.int64, device=self.device)

    def update(self, a: torch.Tensor) -> None:
        if a.device != self.device:
            self.device = a.device
            self.edges, self.counts = self.edges.to(a.device), self.counts.to(a.device)
        flat = as_float(a).reshape(-1)
        if flat.numel() > self.sample:
            step = -(-flat.numel() // self.sample) | 1
            flat = flat[::step].contiguous()
            self.sampled = True
        index = torch.bucketize(flat, self.edges)
        index = torch.where(torch.isfinite(flat), index, self.bins)  # non-finite: the extra bin
        self.counts.index_add_(0, index, torch.ones_like(index))

    def merge(self, other: ValueHistogram) -> ValueHistogram:
        out = ValueHistogram(self.device, sample=self.sample)
        out.counts = self.counts + other.counts.to(self.device)
        out.sampled = self.sampled or other.sampled
        return out

    def compute(self) -> list[int]:
        return [int(c) for c in self.counts[: self.bins].cpu().tolist()]
