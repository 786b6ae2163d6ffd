"""Activations computed inside functorch's transforms: ``torch.func.vmap`` (an ensemble of models stacked with
``torch.func.stack_module_state``, a per-example function mapped over a batch) and ``torch.func.grad`` (forces
as -dE/dx taken in the forward pass).

Inside vmap an activation's input is a batched tensor: it shows one example (its logical shape) and wraps
the plain tensor of every example, the mapped dim somewhere in it (one wrapper per vmap level); inside
``torch.func.grad`` it wraps the plain tensor of the same shape. Neither has storage, so the statistics cannot
read it in place. The site's channel axis is decided on the logical tensor (what the layers say of it, as
everywhere); the statistics are then taken on the plain tensor, every mapped example included, each level's
mapped dim moved in front (a view) and the axis counted past them, with functorch's interpreters off. A
padding mask is laid out on the batch, not on the mapped dims: under vmap it is not applied (the call counts
as one where the mask does not fit, which the report names). Nothing here reads a tensor's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from deadneuron.probe.masks import BatchMask
    from deadneuron.probe.site import Site

_functorch = torch._C._functorch
R = TypeVar("R")


def outside_transforms() -> AbstractContextManager[object]:
    """functorch's interpreter stack cleared while entered (torch's own helper) where a transform runs, so that
    ops on the plain tensors under the wrappers, and tensors made there, stay plain (inside ``torch.func.grad``
    a view of a plain tensor, or a tensor set in place, would be wrapped again)."""
    if _functorch.maybe_current_level() is None:
        return nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by functorch: vmap's batched tensor, or ``torch.func.grad``'s (its data lie in
    the plain tensor it wraps)."""
    return bool(_functorch.is_functorch_wrapped_tensor(t))


def unbatched(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain tensor under ``t``'s functorch wrappers, every vmap level's mapped dim moved in front (a view;
    a ``torch.func.grad`` level maps none), and the number of vmap levels: the logical dim d of ``t`` is dim
    d + levels of the result. Run with functorch's interpreters off (`outside_transforms`): inside a transform a
    view of the plain tensor would be wrapped again."""
    order: list[int] = list(range(t.dim()))  # the dims one level down: the logical ones, the mapped ones < 0
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            order.insert(_functorch.maybe_get_bdim(t), -1 - len(order))
        t = _functorch.get_unwrapped(t)
    mapped = [i for i, d in enumerate(order) if d < 0]
    return t.permute(mapped + [i for i, d in enumerate(order) if d >= 0]), len(mapped)


def measured_unbatched(site: Site, t: torch.Tensor, mask: BatchMask | None, *, call: bool,
                       measure: Callable[[Callable[[torch.Tensor], torch.Tensor], BatchMask | None], R]) -> R:  # fmt: skip
    """``measure(plain, mask)`` with ``site``'s axis counted on the plain tensors under functorch's wrappers for
    the call (``plain(x)``: ``x`` unwrapped as ``t`` is; the axis put back after), functorch's interpreters off
    meanwhile. Under vmap (``call``: the call's first measurement, which counts it) the call counts in
    ``site.vmapped`` and a padding mask that leaves positions out is not applied (it counts as unfitted); under
    ``torch.func.grad`` alone it is."""
    axis, n = site.axis, t.dim()
    with outside_transforms():
        levels = unbatched(t)[1]
        if levels and call:
            site.vmapped += 1
            site.unfitted += mask is not None and mask.index is not None

        def plain(x: torch.Tensor) -> torch.Tensor:
            return unbatched(x)[0]

        site.axis = (axis % n if n else 0) + levels  # counted from the front: the plain tensor's rank differs
        try:
            return measure(plain, None if levels else mask)
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


__all__ = ["is_batched", "measured_unbatched", "outside_transforms", "unbatched", "vmap_warnings"]
