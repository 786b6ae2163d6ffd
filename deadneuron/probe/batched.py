"""Activations computed inside ``torch.func.vmap`` (an ensemble of models stacked with
``torch.func.stack_module_state``, a per-example function mapped over a batch).

Inside vmap an activation's input is a batched tensor: it shows one example (its logical shape) and wraps
the plain tensor of every example, the mapped dim somewhere in it (one wrapper per vmap level). It has no
storage, so the statistics cannot read it in place. The site's channel axis is decided on the logical tensor
(what the layers say of it, as everywhere); the statistics are then taken on the plain tensor, every mapped
example included, each level's mapped dim moved in front (a view) and the axis counted past them. A padding
mask is laid out on the batch, not on the mapped dims: it is not applied there (the call counts as one where
the mask does not fit, which the report names). Nothing here reads a tensor's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from deadneuron.probe.masks import BatchMask
    from deadneuron.probe.site import Site

_functorch = torch._C._functorch
R = TypeVar("R")


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is vmap's batched tensor (its data lie in the plain tensor it wraps)."""
    return bool(_functorch.is_batchedtensor(t))


def unbatched(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain tensor under ``t``'s vmap levels, each level's mapped dim moved in front (the outermost
    first), and the number of levels: the logical dim d of ``t`` is dim d + levels of the result."""
    levels = 0
    while is_batched(t):
        bdim = _functorch.maybe_get_bdim(t)
        t = _functorch.get_unwrapped(t).movedim(bdim, 0)
        levels += 1
    return t, levels


def measured_unbatched(site: Site, t: torch.Tensor, mask: BatchMask | None,
                       measure: Callable[[Callable[[torch.Tensor], torch.Tensor]], R]) -> R:  # fmt: skip
    """``measure(plain)`` with ``site``'s axis counted on the plain tensors under vmap's wrappers for the call
    (``plain(x)``: ``x`` unwrapped as ``t`` is; the axis put back after); a padding mask that leaves positions
    out counts the call as unfitted (it is not applied: ``measure`` passes none)."""
    levels = unbatched(t)[1]
    axis, n = site.axis, t.dim()
    if mask is not None and mask.index is not None:
        site.unfitted += 1

    def plain(x: torch.Tensor) -> torch.Tensor:
        return unbatched(x)[0]

    site.axis = (axis % n if n else 0) + levels  # counted from the front: the plain tensor's rank differs
    try:
        return measure(plain)
    finally:
        site.axis = axis


def vmap_warnings(named: Iterable[tuple[str, Site]]) -> list[str]:
    """A warning per site (``named``: each site's name and running state) measured inside vmap: what its
    figures pool, and where that hides a dead channel."""
    return [f"site {name!r} ran inside torch.func.vmap on {site.vmapped} of its {site.calls} calls: its figures pool "
            "every mapped example, each channel over all of them; where vmap maps over the members of an ensemble "
            "(stacked parameters), a channel counts as dead only where it is dead in every member: audit one member "
            "(its own parameters) for its own figures. A padding mask is not applied inside vmap"
            for name, site in named if site.vmapped]  # fmt: skip


__all__ = ["is_batched", "measured_unbatched", "unbatched", "vmap_warnings"]
