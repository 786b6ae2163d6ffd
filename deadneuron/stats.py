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

from dataclasses import dataclass

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


def _flat_mask(z: torch.Tensor, lo: torch.Tensor | float, hi: float) -> torch.Tensor:
    """Float 0/1 tensor: where z lies in (-inf, lo] or [hi, inf)."""
    mask = torch.le(z, lo).to(z.dtype)
    if hi != _INF:
        mask.add_(torch.ge(z, hi).to(z.dtype))
    return mask


def count_flat(z3: torch.Tensor, lo: torch.Tensor | float, hi: float) -> torch.Tensor:
    """Per-channel count of elements of an (outer, C, inner) view in the flat region.

    ``lo`` is a float or a per-channel tensor of shape (C,) (PReLU with one slope per channel).
    """
    if not isinstance(lo, torch.Tensor) and lo == -_INF and hi == _INF:
        return torch.zeros(z3.shape[1], dtype=torch.int64, device=z3.device)
    lo_b = lo.to(z3.device, z3.dtype).view(1, -1, 1) if isinstance(lo, torch.Tensor) else lo
    return _flat_mask(z3, lo_b, hi).sum(2, dtype=torch.float64).sum(0).to(torch.int64)


@dataclass(frozen=True)
class OutputMoments:
    """Per-channel figures of one batch of activations ``a`` (all tensors of shape (C,))."""

    n: int
    zero: torch.Tensor
    nonfinite: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor


def output_moments(a3: torch.Tensor, eps: float) -> OutputMoments:
    """Counts and moments of an (outer, C, inner) view, in a few fused-friendly passes.

    Partial sums over the innermost dimension come first (much faster than reducing (0, 2) at once
    on CPU). A channel slice with a NaN or Inf element has a non-finite partial sum; only then are
    the exact non-finite counts and the finite-only moments worth a second look, which is done with
    `torch.where` so that no host synchronisation is needed.
    """
    outer, _, inner = a3.shape
    a3 = a3.float() if a3.dtype in (torch.float16, torch.bfloat16) else a3
    finite = torch.isfinite(a3)
    nonfinite = (~finite).sum(2).sum(0)
    clean = torch.where(finite, a3, torch.zeros((), dtype=a3.dtype, device=a3.device))
    part = clean.sum(2, dtype=torch.float64)
    sq = torch.linalg.vector_norm(clean, dim=2, dtype=torch.float64).square_()
    zero = torch.abs(a3).le_(eps).sum(2, dtype=torch.float64).sum(0).to(torch.int64)
    big = torch.full((), _INF, dtype=a3.dtype, device=a3.device)
    mn = torch.where(finite, a3, big).amin(2).amin(0).double()
    mx = torch.where(finite, a3, -big).amax(2).amax(0).double()
    return OutputMoments(outer * inner, zero, nonfinite, part.sum(0), sq.sum(0), mn, mx)


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
    """Streaming per-channel accumulator with declared, mergeable state."""

    _COUNTS = ("zero", "flat", "nonfinite")

    def __init__(self, channels: int, device: torch.device | str | None = None) -> None:
        self.channels = channels
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        c, dev = self.channels, self.device
        self.n = torch.zeros((), dtype=torch.int64, device=dev)
        self.flat_n = torch.zeros((), dtype=torch.int64, device=dev)
        self.zero = torch.zeros(c, dtype=torch.int64, device=dev)
        self.flat = torch.zeros(c, dtype=torch.int64, device=dev)
        self.nonfinite = torch.zeros(c, dtype=torch.int64, device=dev)
        self.sum = torch.zeros(c, dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros(c, dtype=torch.float64, device=dev)
        self.min = torch.full((c,), _INF, dtype=torch.float64, device=dev)
        self.max = torch.full((c,), -_INF, dtype=torch.float64, device=dev)

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            for name in ("n", "flat_n", *self._COUNTS, "sum", "sumsq", "min", "max"):
                setattr(self, name, getattr(self, name).to(device))
            self.device = device

    def _check(self, x3: torch.Tensor, what: str) -> None:
        if x3.shape[1] != self.channels:
            raise ValueError(f"{what} has {x3.shape[1]} channels, this accumulator was built for {self.channels}")

    def update_output(self, a3: torch.Tensor, eps: float = 0.0) -> None:
        """Add a batch of activations viewed as (outer, C, inner)."""
        self._check(a3, "activation")
        self._to(a3.device)
        m = output_moments(a3, eps)
        self.n.add_(m.n)
        self.zero.add_(m.zero)
        self.nonfinite.add_(m.nonfinite)
        self.sum.add_(m.sum)
        self.sumsq.add_(m.sumsq)
        torch.minimum(self.min, m.min, out=self.min)
        torch.maximum(self.max, m.max, out=self.max)

    def update_flat(self, z3: torch.Tensor, lo: torch.Tensor | float, hi: float) -> None:
        """Add a batch of pre-activations viewed as (outer, C, inner): flat-region counts only."""
        self._check(z3, "pre-activation")
        self._to(z3.device)
        self.flat_n.add_(z3.shape[0] * z3.shape[2])
        self.flat.add_(count_flat(z3, lo, hi))

    def update(self, z3: torch.Tensor, a3: torch.Tensor, *, lo: torch.Tensor | float, hi: float, eps: float) -> None:
        self.update_flat(z3, lo, hi)
        self.update_output(a3, eps)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """A new accumulator equal to one that had seen both streams."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        out = ChannelStats(self.channels, self.device)
        dev = self.device
        for name in ("n", "flat_n", *self._COUNTS, "sum", "sumsq"):
            setattr(out, name, getattr(self, name) + getattr(other, name).to(dev))
        out.min = torch.minimum(self.min, other.min.to(dev))
        out.max = torch.maximum(self.max, other.max.to(dev))
        return out

    def compute(self) -> ChannelSummary:
        """Synchronise once and return host values. Moments are over finite elements only."""
        n = int(self.n.item())
        finite = (self.n - self.nonfinite).double().clamp_min(1)
        mean = self.sum / finite
        var = (self.sumsq / finite - mean.square()).clamp_min(0)
        seen = (self.n - self.nonfinite) > 0
        nan = torch.full_like(mean, float("nan"))
        return ChannelSummary(
            n=n,
            zero=self.zero.cpu().tolist(),
            flat=self.flat.cpu().tolist(),
            nonfinite=self.nonfinite.cpu().tolist(),
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
