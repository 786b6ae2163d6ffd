"""Where a tensor's channel dimension is (DESIGN section 3: "derived, never guessed silently").

A channel axis is known where a tensor is produced by a layer whose layout is fixed (conv, norm and
pooling layers: dim 1; linear, embedding, attention, layer norm: the last dim), as a module or as its
functional form called in a forward. `AxisTracker` keeps, for the tensors of the current forward pass,
the axis and how it was decided, carries it through the ops that keep or move the channel dim (module
outputs here, torch ops seen by the functional probe through `produce`/`carry` and the rules of `axisrules`),
and the Recorder asks it for the axis of each activation's input. A tensor of rank 2 or less has one
candidate, its last dim (`AxisSource.RANK`). Where nothing is known the axis is guessed and the site says
so (`AxisSource.GUESSED`); the user can set it per site glob (`AxisSource.USER`).

Axes are kept in the form that holds whatever the rank of the tensor: negative (counted from the end) where
the layout counts the channel dim from the end (linear, embedding, attention: the last dim; conv and pooling:
the dim before their spatial dims, so that an unbatched (C, L) and a batched (N, C, L) agree), non-negative
where it counts from the front (batch and group norm: dim 1). `known` answers the dim of the tensor at hand;
`axis_of` answers the form a site keeps, and `refit` checks a call whose input has another rank against it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deadneuron.errors import UsageError
from deadneuron.probe.axisrules import KEEPING_RULES, AxisRule, AxisSource, reshaped_axis
from deadneuron.probe.order import PositionOrder
from deadneuron.select import matches

if TYPE_CHECKING:
    from deadneuron.probe.site import Site

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


def _raw_axis(n: int, code: int) -> int:
    """The channel axis a `producer_code` of ``code`` gives an ``n``-D tensor, in the rank-robust form: a code
    counted from the end stays negative where the tensor has that dim (a (C,) linear output: -1, as for its
    (N, C) output); dim 0 where it has no such dim."""
    if code == 1:
        return 1 if n >= 2 else 0
    return code if n + code >= 0 else 0


def dim_of(n: int, axis: int) -> int | None:
    """The dim ``axis`` (negative: counted from the end) names in an ``n``-D tensor, None where it has none;
    a 0-dim tensor is read as one channel (dim 0)."""
    if n == 0:
        return 0 if axis in (0, -1) else None
    return axis % n if -n <= axis < n else None


def _spatial_dims(m: nn.Module) -> int | None:
    """How many spatial dims follow the channel dim of ``m``'s output (see `_SPATIAL`); None: not known."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return len(m.kernel_size)
    return next((k for types, k in _SPATIAL if isinstance(m, types)), None)


def output_info(m: nn.Module, *, keeps_layout: bool = False) -> tuple[OutputLayout | None, int | None]:
    """`output_layout` and `producer_code` of ``m``, decided once per module."""
    return output_layout(m, keeps_layout=keeps_layout), producer_code(m)


def producer_code(m: nn.Module) -> int | None:
    """The channel axis ``m``'s type fixes for its output, decided once per module (None: it fixes none): 1
    for dim 1, else the axis counted back from the rank (-1: the last dim; a conv, pooling: before its spatial
    dims, so that unbatched inputs, with no batch dim in front, are read right). See `_raw_axis`."""
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

    def __init__(self, overrides: Mapping[str, int | None] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self.matched: set[str] = set()  # override globs that matched a site
        self._axes: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, AxisSource]]] = {}
        self._single: dict[int, weakref.ref[torch.Tensor]] = {}  # tensors with no channel dim (`AxisSource.NONE`)
        self.order = PositionOrder()  # their positions reordered (flip, roll), against a padding mask

    def reset(self) -> None:
        """Forget the tensors of the previous forward pass."""
        self._axes.clear()
        self._single.clear()
        self.order.reset()

    def single(self, t: torch.Tensor) -> bool:
        """Whether ``t`` has no channel dim (reduced, squeezed or indexed away): one channel."""
        ref = self._single.get(id(t))
        return ref is not None and ref() is t

    def _note(self, t: torch.Tensor, axis: int, source: AxisSource) -> None:
        self._axes[id(t)] = (weakref.ref(t), (axis, source))

    def stored(self, t: torch.Tensor) -> tuple[int, AxisSource] | None:
        """The axis noted for ``t`` in its rank-robust form (negative: counted from the end), or None."""
        entry = self._axes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def known(self, t: torch.Tensor) -> tuple[int, AxisSource] | None:
        """The channel dim of ``t`` (non-negative) and how it was decided, or None where nothing is known."""
        entry = self._axes.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        axis, source = entry[1]
        return (axis % t.dim() if t.dim() else 0, source) if axis < 0 else entry[1]

    def _note_pieces(self, out: Any, axis: int, source: AxisSource) -> None:
        """The tensors of a tuple/list ``out`` (split pieces, pooling values and indices)."""
        for t in out if isinstance(out, (tuple, list)) else ():
            if isinstance(t, torch.Tensor) and dim_of(t.dim(), axis) is not None and self.known(t) is None:
                self._note(t, axis, source)

    def produce(self, rule: AxisRule, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        """A torch op whose rule fixes the axis whatever the input (`Producer`) returned ``out``: note the
        axis the rule derives. An output whose axis is already known (in-place, a no-op cast) keeps it."""
        found = rule(args, kwargs, out, self.known)
        if found is not None:
            self._found(out, found)

    def carry(self, rule: AxisRule, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        """`produce` for a rule that carries a known input axis: nothing to do while nothing is known. A tensor
        with no channel dim stays so through the ops that keep the layout (elementwise, casts), shape kept."""
        if self._axes:
            found = rule(args, kwargs, out, self.known)
            if found is not None:
                self._found(out, found)
                return
        if self._single and rule in KEEPING_RULES and isinstance(out, torch.Tensor) and self.known(out) is None and any(
                isinstance(t, torch.Tensor) and t.shape == out.shape and self.single(t) for t in args):  # fmt: skip
            self._single[id(out)] = weakref.ref(out)

    def _found(self, out: Any, found: tuple[int, AxisSource]) -> None:
        if found[1] is AxisSource.NONE:  # no channel dim left: one channel (each piece of an unbind)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and self.known(t) is None:
                    self._single[id(t)] = weakref.ref(t)
        elif not isinstance(out, torch.Tensor):
            self._note_pieces(out, *found)
        elif self.known(out) is None:
            self._axes[id(out)] = (weakref.ref(out), found)

    def produced(self, t: torch.Tensor, ref: weakref.ref[torch.Tensor], code: int) -> None:
        """`layout_output` of a producer whose `producer_code` is ``code`` and whose output is the plain
        tensor ``t`` (``ref``: a weak reference to it): the axis its type fixes, unless one is known other than
        traced through its own ops (Hugging Face's ``Conv1D``: ``addmm`` with its weight, then ``view``)."""
        entry = self._axes.get(id(t))
        if entry is None or entry[0]() is not t or entry[1][1] is AxisSource.TRACED:
            self._axes[id(t)] = (ref, (_raw_axis(t.dim(), code), AxisSource.PRODUCER))

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
            code = producer_code(m)
            if code is not None:
                self._note(t, _raw_axis(t.dim(), code), AxisSource.PRODUCER)
            return
        x = _first_tensor(args)
        found = self.stored(x) if x is not None else None
        if x is not None and layout is OutputLayout.KEEPS and t.shape == x.shape and self.single(x):
            self._single[id(t)] = weakref.ref(t)  # dropout of a tensor with no channel dim
        if x is None or found is None:
            return
        a = dim_of(x.dim(), found[0]) or 0
        if layout is OutputLayout.KEEPS:
            if t.dim() == x.dim() and (not x.dim() or t.shape[a] == x.shape[a]):  # the form kept, as noted
                self._note(t, found[0], AxisSource.TRACED)
        else:
            j = reshaped_axis(tuple(x.shape), tuple(t.shape), a)
            if j is not None:
                self._note(t, j, AxisSource.TRACED)

    def axis_of(self, z: torch.Tensor, names: tuple[str, ...]) -> tuple[int, AxisSource]:
        """The channel axis of an activation's input ``z`` at the site called ``names`` (globs of
        the user's overrides are matched against each of them), in the form the site keeps: negative where
        it is counted from the end (a user's negative axis; a last dim that is no channel-first producer's)."""
        for glob, axis in self.overrides.items():
            if matches(names, (glob,)):
                self.matched.add(glob)
                if axis is None:  # the user's word: no channel dim, one channel (`Site.view`)
                    return -1, AxisSource.NONE
                if not -max(z.dim(), 1) <= axis < max(z.dim(), 1):
                    raise UsageError(
                        f"channel axis {axis} set for {glob!r} does not fit site {names[0]!r}, whose input has "
                        f"shape {tuple(z.shape)}: give a dim in [-{max(z.dim(), 1)}, {max(z.dim(), 1) - 1}]"
                    )
                return axis, AxisSource.USER
        if self.single(z):
            return -1, AxisSource.NONE  # of z read with a unit dim after its last (`Site.view`)
        found = self.stored(z)
        if found is not None:  # a traced last dim is counted from the end, as channel-last layouts count it
            last = found[1] is AxisSource.TRACED and z.dim() >= 2 and found[0] == z.dim() - 1
            return (-1, found[1]) if last else found
        if z.dim() <= 2:  # the last dim is the only candidate
            return (-1 if z.dim() else 0), AxisSource.RANK
        return (1 if z.dim() >= 4 else -1), AxisSource.GUESSED  # (N, C, H, W...): dim 1; (N, L, C): the last

    def unmatched(self) -> list[str]:
        """Override globs that matched no site (so far)."""
        return [glob for glob in self.overrides if glob not in self.matched]


def fits(z: torch.Tensor, axis: int, channels: int) -> bool:
    """Whether ``z`` can be read at a site whose axis ``axis`` (negative: counted from the end) held
    ``channels`` channels before."""
    n = z.dim()
    return z.shape[axis] == channels if -n <= axis < n else n == 0 and channels == 1


def axis_mismatch(name: str, z: torch.Tensor, axis: int, source: AxisSource, channels: int) -> str | None:
    """Why ``z`` cannot be read at a site whose axis ``axis`` held ``channels`` channels before, or None."""
    if fits(z, axis, channels):
        return None
    dim = dim_of(z.dim(), axis)
    got = f"has {z.shape[axis]} entries" if dim is not None and z.dim() else "does not exist"
    why = "the axis is not the channel dim" if source in (AxisSource.GUESSED, AxisSource.RANK) else \
        "a channel count must not change between batches"
    return (f"site {name!r}: its channel axis {axis if dim is None else dim} ({source.value}) {got} in input "
            f"{tuple(z.shape)} but held {channels} channels before, so {why}; set it with --channel-axis '{name}=AXIS' "
            f"(channel_axis={{{name!r}: AXIS}} in deadneuron.audit)")


def refit(axes: AxisTracker, site: Site, z: torch.Tensor, name: str) -> None:
    """A call of ``site`` (shown as ``name``) whose input ``z`` has another rank than its last call's, or does
    not fit its axis: the axis derived for ``z`` itself must be the dim the site's axis names in ``z`` (counted
    as the site counts it) and hold as many channels, else one line says why. A call whose axis was guessed
    makes the site's axis guessed."""
    axis, source = axes.axis_of(z, site.names)
    mine, theirs = dim_of(z.dim(), site.axis), dim_of(z.dim(), axis)
    if z.dim() != site.rank and mine != theirs:
        counted = f"dim {site.axis} counted from the end" if site.axis < 0 else f"dim {site.axis}"
        raise UsageError(
            f"site {name!r}: its channel axis, {counted} ({site.axis_source.value}, input rank {site.rank}), is "
            f"{'missing from' if mine is None else f'dim {mine} of'} input {tuple(z.shape)}, whose channel dim is "
            f"dim {theirs} ({source.value}): inputs of another rank must keep the channel dim at the same place "
            f"counted from the front or from the end; set it with --channel-axis '{name}=AXIS' (negative: counted "
            f"from the end; channel_axis={{{name!r}: AXIS}} in deadneuron.audit)"
        )
    problem = axis_mismatch(name, z, site.axis, site.axis_source, site.stats.channels)
    if problem is not None:
        raise UsageError(problem)
    site.rank = z.dim()
    if source is AxisSource.GUESSED and site.axis_source not in (AxisSource.USER, AxisSource.NONE):
        site.axis_source = AxisSource.GUESSED
