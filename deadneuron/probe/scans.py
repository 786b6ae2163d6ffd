"""The channel axis through ops along one dim that keep every dim: sorts, top-k, cumulative ops, differences,
repeats, narrowing (DESIGN section 3: "derived, never guessed silently").

Along a dim other than the channel dim they keep the channel dim where it was (``h.sort(2)`` of conv maps
``(N, C, L)``: dim 1); along the channel dim itself they make its entries something else than channels (the
j-th largest, a running maximum), so nothing is carried and the site's axis is found another way. Their
tuple results (``values, indices``) carry it on both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deadneuron.probe.axisrules import SINGLE, AxisSource, Found, Known, source_of


def first_of(out: Any) -> torch.Tensor | None:
    """``out``, or the first tensor of a tuple result (``values`` of ``sort``, ``max(dim)``...)."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else None


class AlongDim:
    """An op along the dim at argument ``at`` (or ``dim=``), ``default`` where not given."""

    def __init__(self, at: int, default: int | None) -> None:
        self.at, self.default = at, default

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
        src, first = source_of(args, kwargs, known), first_of(out)
        if src is None or first is None:
            return None
        x, a = src
        dim = args[self.at] if len(args) > self.at else kwargs.get("dim", self.default)
        if type(dim) is not int or not -x.dim() <= dim < x.dim() or dim % x.dim() == a:
            return None
        return (a, AxisSource.TRACED) if first.dim() == x.dim() and first.shape[a] == x.shape[a] else None


def select(args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
    """``x.select(dim, i)``: that dim taken away (the channel dim: one channel left)."""
    src = source_of(args, kwargs, known)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if src is None or type(dim) is not int or not isinstance(out, torch.Tensor) or not -src[0].dim() <= dim < src[0].dim():
        return None
    x, a = src
    dim %= x.dim()
    return SINGLE if dim == a else (a - (dim < a), AxisSource.TRACED)


_ALONG = {"sort": (1, -1), "topk": (2, -1), "cummax": (1, None), "cummin": (1, None), "logcumsumexp": (1, None),
          "diff": (2, -1), "repeat_interleave": (2, None), "narrow": (1, None), "narrow_copy": (1, None),
          "msort": (99, 0), "argsort": (1, -1)}  # fmt: skip


def scan_rules() -> dict[Any, Any]:
    """Each torch function and Tensor method of such an op (and of ``select``), to its rule."""
    table: dict[Any, Any] = {torch.select: select, torch.Tensor.select: select}
    for name, (at, default) in _ALONG.items():
        for ns in (torch, torch.Tensor):
            if callable(func := getattr(ns, name, None)):
                table[func] = AlongDim(at, default)
    return table
