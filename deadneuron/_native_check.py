"""The C kernel's self-check: run once when a build is loaded (`deadneuron._native.load`), so that a
miscompiled or mismatched build is never used. It compares every kind of call the audit makes with the
torch reference (`deadneuron.moments`) on awkward values (NaN, +-Inf, zeros, -0.0) and every memory layout
the kernel reads, and relu's values written by the relu pass with ``torch.relu``'s bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from deadneuron._native_flow import check_flow
from deadneuron.moments import fused_flat, fused_moments

if TYPE_CHECKING:
    from deadneuron._native import NativeStats

_LAYOUTS = (((3, 5, 37), None), ((9, 2, 300), None), ((9, 3, 70), None), ((4, 6, 3), None), ((7, 9, 1), None),
            ((2, 3, 4), (0, 2, 1)), ((2, 2, 4100), None), ((260, 17, 1), None))  # long rows, tiled columns too
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def fresh_accumulator(channels: int) -> torch.Tensor:
    """An empty (7, C) accumulator in the kernel's layout (zero, flat, finite, mean, m2, min, max)."""
    acc = torch.zeros(7, channels, dtype=torch.float64)
    acc[5] = float("inf")
    acc[6] = -float("inf")
    return acc


def self_check(native: NativeStats) -> str | None:
    """What of the kernel disagreed with the torch reference, or None where nothing did."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for shape, perm in _LAYOUTS:
            x = torch.randn(shape, generator=g, dtype=dtype) + 3.0
            x.view(-1)[::7] = 0.0
            x.view(-1)[3], x.view(-1)[5] = float("nan"), float("inf")
            x.view(-1)[-2] = -float("inf")
            f = x - 3.0
            f.view(-1)[0] = float("inf")  # a non-finite pre-activation beside a finite activation: not flat
            f.view(-1)[1] = -0.0
            if perm is not None:  # channels contiguous: (outer, C, inner) with sc == 1
                x = x.permute(*perm).contiguous().permute(*perm)
            failed = _statistics(native, x, f) or _relu(native, x, f, perm is not None) or _flat(native, x, f)
            if failed is not None:
                return failed
    return check_flow(native)


def _statistics(native: NativeStats, x: torch.Tensor, f: torch.Tensor) -> str | None:
    for f3 in (None, f):
        acc, counts = fresh_accumulator(x.shape[1]), torch.zeros(2, dtype=torch.float64)
        native.update(x, f3, 0.0, -0.5, 0.5, True, acc, counts)
        if not _agrees(acc, fused_moments(x, x if f3 is None else f3, 0.0, -0.5, 0.5)):
            return "the built kernel disagreed with the torch reference"
        if counts.tolist() != [x.shape[0] * x.shape[2]] * 2:
            return "the built kernel miscounted elements"
    return None


def _relu(native: NativeStats, x: torch.Tensor, f: torch.Tensor, permuted: bool) -> str | None:
    """relu(z)'s statistics from z, under relu's default thresholds (the fast pass, which can write relu's
    values) and others; relu's values written where asked, also into a tensor laid out as a permuted z."""
    finite = torch.nan_to_num(f, 0.0, 1.0, -1.0)  # the fast pass alone, and with the checks after it
    relu_layout = torch.empty_like(x).copy_(f) if permuted else f
    cases = ((f, -0.5, 0.5), (x - 3.0 if not permuted else x, -0.5, 0.5), (f, 0.0, math.inf), (finite, 0.0, math.inf),
             (relu_layout, 0.0, math.inf))  # fmt: skip
    for z3, lo, hi in cases:
        want = fused_moments(torch.relu(z3), z3, 0.0, lo, hi)
        for write in (False, True):
            acc, counts = fresh_accumulator(x.shape[1]), torch.zeros(2, dtype=torch.float64)
            out = torch.full_like(z3, 7.0) if write else None
            status = native.plan(z3, 0.0, lo, hi, True, acc, counts, relu=True)(z3.data_ptr(), None if out is None else out.data_ptr())
            if write and lo != 0.0:
                if status != 3 or not torch.equal(acc, fresh_accumulator(x.shape[1])):
                    return "the built kernel's relu pass wrote under thresholds it must refuse"
                continue
            if status != 0 or not _agrees(acc, want):
                return "the built kernel's relu statistics disagreed with the torch reference"
            if out is not None and not torch.equal(out.view(_BITS[z3.dtype]), torch.relu(z3).view(_BITS[z3.dtype])):
                return "the built kernel's relu values differed from torch.relu's"
    return None


def _flat(native: NativeStats, x: torch.Tensor, f: torch.Tensor) -> str | None:
    for z3 in (f, x, f[:, :, ::2]):  # the flat counts alone, on every layout (strided rows too)
        flat, fc = fresh_accumulator(x.shape[1]), torch.zeros(2, dtype=torch.float64)
        native.flat(z3, -0.5, 0.5, flat, fc)
        if not torch.equal(flat[1], fused_flat(z3, -0.5, 0.5)) or fc.tolist() != [0, z3.shape[0] * z3.shape[2]]:
            return "the built kernel's flat counts disagreed with the torch reference"
    return None


def _agrees(acc: torch.Tensor, want: tuple[torch.Tensor, ...]) -> bool:
    """Counts and range exactly, the moments to float64 rounding."""
    w = torch.stack(want)
    return torch.equal(acc[[0, 1, 2, 5, 6]], w[[0, 1, 2, 5, 6]]) and torch.allclose(acc[3:5], w[3:5], rtol=1e-10, atol=1e-12)
