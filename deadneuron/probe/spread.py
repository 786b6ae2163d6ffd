"""A padding mask's valid rows read in place where the mask's dims are not the leading ones.

A channels-last site whose mask lies on dims other than its leading ones (a spatial-broadcast decoder's
(N, K, H, W, C) under an (N, H, W) mask on dims (0, 2, 3); a sequence-first (L, N, C) on dims (1, 0)) would
have its positions moved to the front (`deadneuron.probe.masks.masked_channel_view`): a copy of the whole
tensor, then the valid rows gathered, a second one. Where the tensor is rows of channels in memory (its
channel dim last, the other dims one run of rows), the valid rows are named by their index instead and the
statistics read them in place (`deadneuron.stats.ChannelStats.update_output_rows`): the mask's valid positions,
each at every index of the dims the mask does not cover (the mask repeated over them). Index arithmetic on the
mask's device, no host synchronisation: the number of rows is the mask's valid count times those dims' sizes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deadneuron.probe.masks import BatchMask
    from deadneuron.probe.placement import Placement


def spread_rows(x: torch.Tensor, axis: int, mask: BatchMask, place: Placement) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``x`` as (rows, C, 1), the indices of its valid rows (for each index of the dims the mask does not
    cover, the mask's valid positions in its order) and the elements per channel left out; None where the
    placement leads (read as laid out already), the channel is not last, or the rows are not one run."""
    if place.leading or place.flattened or mask.index is None or axis % x.dim() != x.dim() - 1:
        return None
    dims = tuple(x.shape[:-1])
    if x.stride(-1) != 1 or any(x.stride(d) != x.shape[-1] * math.prod(dims[d + 1 :]) for d in range(len(dims))):
        return None  # not rows of channels at one stride
    step = [math.prod(dims[d + 1 :]) for d in range(len(dims))]  # a dim's step in rows
    index = mask.index if mask.index.device == x.device else mask.index.to(x.device)
    base = torch.zeros_like(index)
    for j, (d, size) in enumerate(zip(place.dims, mask.shape, strict=True)):
        base += index // math.prod(mask.shape[j + 1 :]) % size * step[d]
    others = [d for d in range(len(dims)) if d not in place.dims]
    spread = torch.zeros(1, dtype=index.dtype, device=index.device)
    for d in others:
        spread = (spread[:, None] + torch.arange(dims[d], device=index.device) * step[d]).reshape(-1)
    rows = (spread[:, None] + base[None, :]).reshape(-1)
    excluded = (mask.positions - mask.valid) * math.prod(dims[d] for d in others)
    return x.view(-1, x.shape[-1], 1), rows, excluded

