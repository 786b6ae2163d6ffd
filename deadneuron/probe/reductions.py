"""The channel axis through reductions (DESIGN section 3: "derived, never guessed silently").

A reduction over other dims keeps the channel dim (a global average pool, ``x.mean((2, 3))``: the channels
move to where the reduced dims leave them); one over the channel dim itself leaves a tensor with no channel
dim (a per-token score ``(h * w).sum(-1)``, a norm over features): every element of it belongs to the one
channel that remains, which is how a site reading it is measured (`AxisSource.NONE`). With ``keepdim`` the
channel dim stays where it was; reduced so, it is a statistic per position that broadcasts back over the
channels (a hand-written layer or RMS norm's mean and variance), which carries no axis: the elementwise op
that applies it keeps the data's. A reduction over every dim gives a scalar, one channel already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deadneuron.probe.axisrules import SINGLE, AxisSource, Found, Known, elementwise, source_of
from deadneuron.probe.scans import first_of


class Reduction:
    """``sum``, ``mean``, ``amax``... with their ``dim`` at argument ``at`` (``norm``: after ``p``; ``kthvalue``,
    ``quantile``: after ``k``, ``q``); a tuple result (``max(dim)``, ``median``, ``std_mean``) carries it on each
    tensor. ``binary``: ``torch.max(a, b)`` with a tensor second is elementwise instead."""

    def __init__(self, at: int = 1, *, binary: bool = False) -> None:
        self.at, self.binary = at, binary

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> Found:
        if self.binary and (isinstance(args[1] if len(args) > 1 else kwargs.get("other"), torch.Tensor)):
            return elementwise(args, kwargs, out, known)
        src, out = source_of(args, kwargs, known), first_of(out)
        if src is None or out is None:
            return None
        x, a = src
        dim = args[self.at] if len(args) > self.at else kwargs.get("dim")
        items = (dim,) if isinstance(dim, int) else dim if isinstance(dim, (tuple, list)) else None
        if not items or not x.dim() or any(type(d) is not int or not -x.dim() <= d < x.dim() for d in items):
            return None  # every dim (a scalar), or arguments read another way
        dims = {d % x.dim() for d in items}
        keep = args[self.at + 1] if len(args) > self.at + 1 else kwargs.get("keepdim", False)
        if keep is True:  # over the channel dim: a statistic per position that broadcasts back (a norm's)
            return (a, AxisSource.TRACED) if out.dim() == x.dim() and a not in dims else None
        if a in dims:
            return SINGLE if out.dim() == x.dim() - len(dims) else None
        j = a - sum(1 for d in dims if d < a)
        return (j, AxisSource.TRACED) if out.dim() == x.dim() - len(dims) and out.shape[j] == x.shape[a] else None


_AT_ONE = ("sum", "mean", "nansum", "nanmean", "amax", "amin", "logsumexp", "std", "var", "prod", "median", "nanmedian",
           "mode", "std_mean", "var_mean", "aminmax")  # fmt: skip
_AT_TWO = ("kthvalue", "quantile", "nanquantile")


def reduction_rules() -> dict[Any, Reduction]:
    """Each torch function and Tensor method of a reduction, to its rule."""
    table: dict[Any, Reduction] = {}
    for name in _AT_ONE:
        for ns in (torch, torch.Tensor):
            if callable(func := getattr(ns, name, None)):
                table[func] = Reduction()
    for name in _AT_TWO:
        for ns in (torch, torch.Tensor):
            if callable(func := getattr(ns, name, None)):
                table[func] = Reduction(at=2)
    for ns in (torch, torch.Tensor):
        table[ns.max] = table[ns.min] = Reduction(binary=True)
    table[torch.norm] = table[torch.Tensor.norm] = table[torch.linalg.vector_norm] = Reduction(at=2)
    return table
