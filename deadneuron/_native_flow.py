"""The gradient-flow sums of the C kernel (`_stats.c`, ``deadneuron_flow_planned``): its call's layout and
the load-time check against a float64 torch reference.

Per channel of an (outer, C, inner) batch: the float64 sum of ``|g|`` and the count of ``g != 0``, added
into two float64 accumulators; a channel with a NaN in the batch gets NaN for both of that batch's sums
(as `deadneuron.gradflow` sums them in torch). `deadneuron._native.NativeStats.flow_plan` prepares the
call; `check_flow` runs when the kernel is loaded, so that a miscompiled build is not used.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import torch


class FlowPlan(ctypes.Structure):
    """`deadneuron_flow_plan` of `_stats.c`: one call's view shape and strides and its accumulators."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("outer", "C", "inner", "so", "sc", "si")),
        ("abs_sum", ctypes.c_void_p), ("nonzero", ctypes.c_void_p),
        ("dtype", ctypes.c_int32), ("threads", ctypes.c_int32),
        ("rows", ctypes.c_void_p),
    ]


class _Prepared(Protocol):
    def __call__(self, a_ptr: int, f_ptr: int | None) -> int: ...

    def rows(self, a_ptr: int, f_ptr: int | None, offsets: torch.Tensor) -> int: ...


class _Flows(Protocol):
    def flow_plan(self, x3: torch.Tensor, abs_sum: torch.Tensor, nonzero: torch.Tensor | None) -> _Prepared: ...


def flow_reference(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of an (outer, C, inner) view, in float64: (sum |x|, count of x != 0), both NaN where
    the channel holds a NaN."""
    x = x3.double()
    l1 = x.abs().sum((0, 2))
    nonzero = (x != 0).sum((0, 2)).double()
    return l1, torch.where(l1.isnan(), float("nan"), nonzero)


def _same(got: torch.Tensor, want: torch.Tensor, *, exact: bool) -> bool:
    if not torch.equal(got.isnan(), want.isnan()):
        return False
    ok = ~want.isnan()
    if exact:
        return torch.equal(got[ok], want[ok])
    return torch.allclose(got[ok], want[ok], rtol=1e-12, atol=0.0)


def _samples(dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    """Awkward values (zeros, -0.0, NaN, +-Inf, subnormals, an all-zero channel) on every layout the
    kernel reads differently: runs, columns, grouped columns, any strides."""
    out = []
    for shape, perm in (((3, 5, 70), None), ((9, 2, 300), None), ((9, 3, 20), None), ((4, 6, 3), None),
                        ((7, 9, 1), None), ((2, 3, 4), (0, 2, 1)), ((5, 70, 6), (0, 2, 1))):  # fmt: skip
        x = torch.randn(shape, generator=g, dtype=dtype)
        x.view(-1)[::5] = 0.0
        x.view(-1)[1::11] = -0.0
        x.view(-1)[2::13] = torch.finfo(dtype).tiny / 4
        x.view(-1)[3], x.view(-1)[-2] = float("nan"), -float("inf")
        x.view(-1)[7] = float("inf")
        x[:, -1] = 0.0  # a channel with no non-zero element
        if perm is not None:  # channels contiguous: (outer, C, inner) with sc == 1
            x = x.permute(*perm).contiguous().permute(*perm)
        out += [x, x[:, :, ::2]]  # and with strided rows (si == 2)
    return out


def check_flow(native: _Flows) -> str | None:
    """Compare the kernel's sums with `flow_reference` (the |x| sums to 1e-12 relative, the counts
    exactly, NaN where the reference has NaN), added into non-zero accumulators, whole and on chosen
    rows; the reason it failed, or None."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for x in _samples(dtype, g):
            l1, nonzero = flow_reference(x)
            for counted in (True, False):
                acc, cnt = torch.ones(x.shape[1], dtype=torch.float64), torch.full((x.shape[1],), 2.0, dtype=torch.float64)
                if native.flow_plan(x, acc, cnt if counted else None)(x.data_ptr(), None) != 0:
                    return "the built kernel refused a gradient-flow batch"
                want = nonzero + 2 if counted else torch.full_like(cnt, 2.0)  # not counted: left as it was
                if not (_same(acc, l1 + 1, exact=False) and _same(cnt, want, exact=True)):
                    return "the built kernel's gradient-flow sums disagreed with the torch reference"
            keep = torch.arange(x.shape[0] - 1, -1, -2)  # every other row, backwards
            acc, cnt = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
            native.flow_plan(x, acc, cnt).rows(x.data_ptr(), None, keep * x.stride(0))
            l1, nonzero = flow_reference(x.index_select(0, keep))
            if not (_same(acc, l1, exact=False) and _same(cnt, nonzero, exact=True)):
                return "the built kernel's gradient-flow sums over chosen rows disagreed with the torch reference"
    return None
