"""Per-batch, per-channel statistics as torch ops, and Chan's merge of moments (no state, no I/O).

`fused_moments` is the reference every kernel is tested against (the C kernel of `deadneuron._native`
and its `torch.compile`d form); eager, it is the kernel on CUDA and wherever nothing faster loads.
For one batch viewed as (outer, C, inner) it gives, per channel, as float64 tensors:

    zero    elements of a with |a| <= eps
    flat    elements of f (the pre-activation z, or a itself where the flat region can be read on the
            output) that are finite and in (-inf, lo] or [hi, inf); NaN thresholds: none
    finite  finite elements of a
    mean    mean of the finite elements of a (0 where there are none)
    m2      their centred sum of squares, sum((a - mean)^2)
    min/max range of the finite elements of a (+inf/-inf where there are none)

Counts are summed as integers (exact in any input dtype). Moments are computed in float64 in two
passes (mean, then the centred sums, corrected by their own mean), so a channel with mean 2e4 and std
1 keeps its std to about 1e-12. `merge_moments_` adds one such (finite, mean, m2) into another with
Chan's parallel formula.
"""

from __future__ import annotations

import torch

_INF = float("inf")

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Per-channel count of an (outer, C, inner) bool mask, exact (integer sums), as float64."""
    return mask.sum(2).sum(0).double()


def in_region(z3: torch.Tensor, lo: torch.Tensor | float, hi: float, finite: torch.Tensor | None = None) -> torch.Tensor:
    """Elements of ``z3`` that are finite and in (-inf, lo] or [hi, inf): a non-finite value is never
    flat. ``lo`` may be a tensor that broadcasts against ``z3`` (one threshold per channel);
    ``finite``: ``torch.isfinite(z3)`` where the caller has it."""
    return (torch.isfinite(z3) if finite is None else finite) & ((z3 <= lo) | (z3 >= hi))


def empty_moments(channels: int, device: torch.device) -> Moments:
    """The statistics of a batch with no elements."""
    z = torch.zeros(channels, dtype=torch.float64, device=device)
    return z, z.clone(), z.clone(), z.clone(), z.clone(), z + _INF, z - _INF


def fused_moments(a3: torch.Tensor, f3: torch.Tensor, eps: float, lo: float, hi: float) -> Moments:
    """Per-channel (zero, flat, finite, mean, m2, min, max) of an (outer, C, inner) batch (see the
    module docstring). Written as one expression graph so that `torch.compile` can fuse it."""
    if a3.shape[0] == 0 or a3.shape[2] == 0:  # nothing seen (amin/amax would raise)
        return empty_moments(a3.shape[1], a3.device)
    clean = torch.nan_to_num(a3, 0.0, 0.0, 0.0)  # (faster than torch.where on CPU)
    finite = clean == a3
    zero = _count(a3.abs() <= eps)
    flat = _count(in_region(f3, lo, hi, finite if f3 is a3 else None))
    count = _count(finite)
    per = count.clamp_min(1.0)[None, :, None]
    x = clean.double()
    shift = x.sum(2, keepdim=True).sum(0, keepdim=True) / per
    d = (x - shift).masked_fill_(~finite, 0.0)
    s = d.sum(2, keepdim=True).sum(0, keepdim=True)
    q = (d * d).sum(2).sum(0)
    mean = (shift + s / per).view(-1)
    m2 = (q - (s * s / per).view(-1)).clamp_min(0.0)
    mn = torch.nan_to_num(a3, _INF, _INF, _INF).amin(2).amin(0).double()
    mx = torch.nan_to_num(a3, -_INF, -_INF, -_INF).amax(2).amax(0).double()
    return zero, flat, count, mean, m2, mn, mx


def fused_flat(z3: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-channel count of the finite elements of an (outer, C, inner) view in (-inf, lo] or [hi, inf)."""
    return _count(in_region(z3, lo, hi))


def channel_flat(z3: torch.Tensor, lo: torch.Tensor, hi: float) -> torch.Tensor:
    """`fused_flat` with one ``lo`` per channel (PReLU: one slope per channel)."""
    return _count(in_region(z3, lo.to(z3.device, z3.dtype).view(1, -1, 1), hi))


def merge_moments_(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
    count_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
) -> None:
    """Merge (count_b, mean_b, m2_b) into (count, mean, m2) in place, per channel (Chan et al.).

    Channels with no elements carry mean 0 and m2 0 (never NaN), so nothing here divides by zero."""
    total = count + count_b
    weight = count_b / total.clamp_min(1.0)
    delta = mean_b - mean
    m2.add_(m2_b + delta * delta * count * weight)
    mean.add_(delta * weight)
    count.copy_(total)
