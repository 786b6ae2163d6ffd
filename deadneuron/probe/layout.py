"""Where a tensor's channel dimension is (DESIGN section 3: "derived, never guessed silently").

A channel axis is known where a tensor is produced by a layer whose layout is fixed (conv, norm and
pooling layers: dim 1; linear, embedding, attention, layer norm: the last dim). `AxisTracker` keeps,
for the tensors of the current forward pass, the axis and how it was decided, and the Recorder asks it
for the axis of each activation's input. Where nothing is known the axis is guessed and the site says
so (`AxisSource.GUESSED`); the user can set it per site glob (`AxisSource.USER`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from deadneuron.select import matches

CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)
CHANNEL_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)


class AxisSource(StrEnum):
    """How a site's channel axis was decided."""

    PRODUCER = "producer"  # the tensor came straight from a layer whose layout is known
    TRACED = "traced"  # carried from such a layer through ops that keep or move the channel dim
    GUESSED = "guessed"  # nothing known: dim 1 for 4-D and more, else the last dim
    USER = "user"  # set by the user (channel_axis={glob: axis})


def guess_axis(x: torch.Tensor) -> int:
    """The fallback when nothing is known: 1 for (N, C, H, W...), the last dim otherwise."""
    if x.dim() <= 2:
        return x.dim() - 1 if x.dim() else 0
    return 1 if x.dim() >= 4 else x.dim() - 1


def producer_axis(x: torch.Tensor, producer: nn.Module | None) -> int | None:
    """The channel dim of ``x`` if ``producer`` (the module that returned it) fixes it, else None."""
    if x.dim() <= 1:
        return x.dim() - 1 if x.dim() else 0
    if isinstance(producer, CHANNEL_FIRST):
        return 1
    if isinstance(producer, CHANNEL_LAST):
        return x.dim() - 1
    return None


class AxisTracker:
    """Channel axes of the tensors of one forward pass, keyed by tensor identity (weakly held).

    ``overrides`` maps site globs to a user-given axis (negative counts from the end).
    """

    def __init__(self, overrides: Mapping[str, int] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._axes: dict[int, tuple[weakref.ref[torch.Tensor], int, AxisSource]] = {}

    def reset(self) -> None:
        """Forget the tensors of the previous forward pass."""
        self._axes.clear()

    def _note(self, t: torch.Tensor, axis: int, source: AxisSource) -> None:
        self._axes[id(t)] = (weakref.ref(t), axis, source)

    def known(self, t: torch.Tensor) -> tuple[int, AxisSource] | None:
        entry = self._axes.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def module_output(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """A module returned ``out``: note its axis where the module's type fixes it."""
        if isinstance(out, torch.Tensor) and self.known(out) is None:
            axis = producer_axis(out, m)
            if axis is not None:
                self._note(out, axis, AxisSource.PRODUCER)

    def axis_of(self, z: torch.Tensor, names: tuple[str, ...]) -> tuple[int, AxisSource]:
        """The channel axis of an activation's input ``z`` at the site called ``names`` (globs of
        the user's overrides are matched against each of them)."""
        for glob, axis in self.overrides.items():
            if matches(names, (glob,)):
                return axis % max(z.dim(), 1), AxisSource.USER
        found = self.known(z)
        if found is not None:
            return found
        return guess_axis(z), AxisSource.GUESSED
