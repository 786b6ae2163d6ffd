"""Where a tensor's channel dimension is (DESIGN section 3: "derived, never guessed silently").

A channel axis is known where a tensor is produced by a layer whose layout is fixed (conv, norm and
pooling layers: dim 1; linear, embedding, attention, layer norm: the last dim), as a module or as its
functional form called in a forward. `AxisTracker` keeps, for the tensors of the current forward pass,
the axis and how it was decided, carries it through the ops that keep or move the channel dim (module
outputs here, torch ops seen by the functional probe through `produce`/`carry` and the rules of `axisrules`),
and the Recorder asks it for the axis of each activation's input. A tensor of rank 2 or less has one
candidate, its last dim (`AxisSource.RANK`). Where nothing is known the axis is guessed and the site says
so (`AxisSource.GUESSED`); the user can set it per site glob (`AxisSource.USER`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import nn

from deadneuron.errors import UsageError
from deadneuron.probe.axisrules import AxisRule, AxisSource, reshaped_axis
from deadneuron.probe.order import PositionOrder
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
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
CHANNEL_LAST: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.RNNBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)  # fmt: skip
# Leaves whose output has the input's layout where it keeps the rank and the channel dim's size (GLU
# halves a dim: then nothing is noted). Activations the Recorder registered beyond torch's own are
# passed as `output_layout(..., keeps_layout=True)`.
_TORCH_ACTIVATIONS = tuple(
    c for c in vars(nn.modules.activation).values()
    if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == nn.modules.activation.__name__
    and c is not nn.MultiheadAttention
)  # fmt: skip
LAYOUT_KEEPING: tuple[type[nn.Module], ...] = (
    *_TORCH_ACTIVATIONS,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    *((nn.modules.padding._CircularPadNd,) if hasattr(nn.modules.padding, "_CircularPadNd") else ()),
)
RESHAPING: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)
# Channel-first producers that also take unbatched inputs ((C, L), (C, H, W)): their channel dim is the one
# before their spatial dims (conv: as many as its kernel has), dim 0 where no batch dim is in front.
_SPATIAL: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    *((tuple(getattr(nn, f"{name}{k}d") for name in ("MaxPool", "AvgPool", "AdaptiveMaxPool", "AdaptiveAvgPool",
                                                    "InstanceNorm")), k) for k in (1, 2, 3)),
    ((nn.PixelShuffle, nn.PixelUnshuffle), 2),
)  # fmt: skip
_PRODUCERS = (*CHANNEL_FIRST, *CHANNEL_LAST)
_MULTI_DIM_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


class OutputLayout(Enum):
    """What a module's type says about the channel axis of its output (decided once per module)."""

    PRODUCER = "producer"  # fixes it (conv, norm, pooling: dim 1; linear, embedding...: the last dim)
    KEEPS = "keeps"  # keeps its input's (activations, dropout, padding, identity)
    RESHAPES = "reshapes"  # moves it where the channel dim survives whole (flatten, unflatten)


def _fixes_axis(m: nn.Module) -> bool:
    """Whether ``m``'s type fixes its output's channel axis: a layer norm over several trailing dims
    (``LayerNorm([C, H, W])`` on a conv map) keeps its input's instead, its last dim being no channel dim.
    Hugging Face's ``Conv1D`` (GPT-2's linear layer, ``addmm`` on its input's last dim) is a channel-last
    producer as ``nn.Linear`` is; it is told by its class, transformers not imported."""
    if isinstance(m, _MULTI_DIM_NORMS) and len(getattr(m, "normalized_shape", ())) > 1:
        return False
    cls = type(m)
    return isinstance(m, _PRODUCERS) or (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."))


def output_layout(m: nn.Module, *, keeps_layout: bool = False) -> OutputLayout | None:
    """How `AxisTracker.layout_output` treats ``m``'s outputs; None: it notes nothing for them."""
    if _fixes_axis(m):
        return OutputLayout.PRODUCER
    if keeps_layout or isinstance(m, (*LAYOUT_KEEPING, *_MULTI_DIM_NORMS)):
        return OutputLayout.KEEPS
    return OutputLayout.RESHAPES if isinstance(m, RESHAPING) else None


def guess_axis(x: torch.Tensor) -> int:
    """The fallback when nothing is known: 1 for (N, C, H, W...), the last dim otherwise."""
    if x.dim() <= 2:
        return x.dim() - 1 if x.dim() else 0
    return 1 if x.dim() >= 4 else x.dim() - 1


def producer_axis(x: torch.Tensor, producer: nn.Module | None) -> int | None:
    """The channel dim of ``x`` if ``producer`` (the module that returned it) fixes it, else None."""
    if producer is None or not _fixes_axis(producer):
        return None
    if x.dim() <= 1:
        return 0
    if (spatial := _spatial_dims(producer)) is not None:  # unbatched inputs have no batch dim in front
        return max(x.dim() - spatial - 1, 0)
    return 1 if isinstance(producer, CHANNEL_FIRST) else x.dim() - 1


def _spatial_dims(m: nn.Module) -> int | None:
    """How many spatial dims follow the channel dim of ``m``'s output (see `_SPATIAL`); None: not known."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return len(m.kernel_size)
    return next((k for types, k in _SPATIAL if isinstance(m, types)), None)


def output_info(m: nn.Module, *, keeps_layout: bool = False) -> tuple[OutputLayout | None, int | None]:
    """`output_layout` and `producer_code` of ``m``, decided once per module."""
    return output_layout(m, keeps_layout=keeps_layout), producer_code(m)


def producer_code(m: nn.Module) -> int | None:
    """`producer_axis` of ``m`` as a number decided once per module (None: its type fixes no axis): 1 for
    dim 1, else the axis counted back from the rank (-1: the last dim; a conv: before its kernel dims)."""
    if not _fixes_axis(m):
        return None
    if (spatial := _spatial_dims(m)) is not None:
        return -spatial - 1
    return 1 if isinstance(m, CHANNEL_FIRST) else -1


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


class AxisTracker:
    """Channel axes of the tensors of one forward pass, keyed by tensor identity (weakly held).

    ``overrides`` maps site globs to a user-given axis (negative counts from the end).
    """

    def __init__(self, overrides: Mapping[str, int] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self.matched: set[str] = set()  # override globs that matched a site
        self._axes: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, AxisSource]]] = {}
        self.order = PositionOrder()  # their positions reordered (flip, roll), against a padding mask

    def reset(self) -> None:
        """Forget the tensors of the previous forward pass."""
        self._axes.clear()
        self.order.reset()

    def _note(self, t: torch.Tensor, axis: int, source: AxisSource) -> None:
        self._axes[id(t)] = (weakref.ref(t), (axis, source))

    def known(self, t: torch.Tensor) -> tuple[int, AxisSource] | None:
        entry = self._axes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _note_pieces(self, out: Any, axis: int, source: AxisSource) -> None:
        """The tensors of a tuple/list ``out`` (split pieces, pooling values and indices)."""
        for t in out if isinstance(out, (tuple, list)) else ():
            if isinstance(t, torch.Tensor) and t.dim() > axis and self.known(t) is None:
                self._note(t, axis, source)

    def produce(self, rule: AxisRule, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        """A torch op whose rule fixes the axis whatever the input (`Producer`) returned ``out``: note the
        axis the rule derives. An output whose axis is already known (in-place, a no-op cast) keeps it."""
        found = rule(args, kwargs, out, self.known)
        if found is not None:
            self._found(out, found)

    def carry(self, rule: AxisRule, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        """`produce` for a rule that carries a known input axis: nothing to do while nothing is known."""
        if self._axes:
            found = rule(args, kwargs, out, self.known)
            if found is not None:
                self._found(out, found)

    def _found(self, out: Any, found: tuple[int, AxisSource]) -> None:
        if not isinstance(out, torch.Tensor):
            self._note_pieces(out, *found)
        elif self.known(out) is None:
            self._axes[id(out)] = (weakref.ref(out), found)

    def produced(self, t: torch.Tensor, ref: weakref.ref[torch.Tensor], code: int) -> None:
        """`layout_output` of a producer whose `producer_code` is ``code`` and whose output is the plain
        tensor ``t`` (``ref``: a weak reference to it): the axis its type fixes, unless one is known."""
        entry = self._axes.get(id(t))
        if entry is None or entry[0]() is not t:
            n = t.dim()
            self._axes[id(t)] = (ref, (0 if n <= 1 else 1 if code == 1 else max(n + code, 0), AxisSource.PRODUCER))

    def layout_output(self, layout: OutputLayout, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """Module ``m``, whose type says ``layout`` (`output_layout`, decided once per module), returned
        ``out``: note its axis where the type fixes it or keeps its input's. An axis already known (a
        wrapper returning its inner conv's tensor) is kept."""
        t = out if isinstance(out, torch.Tensor) else None
        if t is None and layout is OutputLayout.PRODUCER and isinstance(out, (tuple, list)) and out \
                and isinstance(m, CHANNEL_LAST) and isinstance(out[0], torch.Tensor):
            t = out[0]  # attention, RNNs: (output, state)
        if t is None or self.known(t) is not None:
            return
        if layout is OutputLayout.PRODUCER:
            axis = producer_axis(t, m)
            if axis is not None:
                self._note(t, axis, AxisSource.PRODUCER)
            return
        x = _first_tensor(args)
        found = self.known(x) if x is not None else None
        if found is None:
            return
        a = found[0]
        if layout is OutputLayout.KEEPS:
            if t.dim() == x.dim() and t.shape[a] == x.shape[a]:  # type: ignore[union-attr]
                self._note(t, a, AxisSource.TRACED)
        else:
            j = reshaped_axis(tuple(x.shape), tuple(t.shape), a)  # type: ignore[union-attr]
            if j is not None:
                self._note(t, j, AxisSource.TRACED)

    def axis_of(self, z: torch.Tensor, names: tuple[str, ...]) -> tuple[int, AxisSource]:
        """The channel axis of an activation's input ``z`` at the site called ``names`` (globs of
        the user's overrides are matched against each of them)."""
        for glob, axis in self.overrides.items():
            if matches(names, (glob,)):
                self.matched.add(glob)
                if not -max(z.dim(), 1) <= axis < max(z.dim(), 1):
                    raise UsageError(
                        f"channel axis {axis} set for {glob!r} does not fit site {names[0]!r}, whose input has "
                        f"shape {tuple(z.shape)}: give a dim in [-{max(z.dim(), 1)}, {max(z.dim(), 1) - 1}]"
                    )
                return axis % max(z.dim(), 1), AxisSource.USER
        found = self.known(z)
        if found is not None:
            return found
        if z.dim() <= 2:
            return guess_axis(z), AxisSource.RANK
        return guess_axis(z), AxisSource.GUESSED

    def unmatched(self) -> list[str]:
        """Override globs that matched no site (so far)."""
        return [glob for glob in self.overrides if glob not in self.matched]


def fits(z: torch.Tensor, axis: int, channels: int) -> bool:
    """Whether ``z`` can be read at a site whose axis ``axis`` held ``channels`` channels before."""
    n = z.dim()
    return z.shape[axis] == channels if n > axis else n == 0 and channels == 1


def axis_mismatch(name: str, z: torch.Tensor, axis: int, source: AxisSource, channels: int) -> str | None:
    """Why ``z`` cannot be read at a site whose axis ``axis`` held ``channels`` channels before, or None."""
    if fits(z, axis, channels):
        return None
    got = f"has {z.shape[axis]} entries" if z.dim() > axis else "does not exist"
    why = "the axis is not the channel dim" if source in (AxisSource.GUESSED, AxisSource.RANK) else \
        "a channel count must not change between batches"
    return (f"site {name!r}: its channel axis {axis} ({source.value}) {got} in input {tuple(z.shape)} but held "
            f"{channels} channels before, so {why}; set it with --channel-axis '{name}=AXIS' "
            f"(channel_axis={{{name!r}: AXIS}} in deadneuron.audit)")
