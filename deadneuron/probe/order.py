"""Positions reordered inside the forward pass (DESIGN section 3, "Masks: padding is not data").

A padding mask lies on a batch's positions in the batch's own order. A model can reorder them before a
layer reads them: a bidirectional sequence model runs a block on ``x.flip(1)`` (Vision Mamba, Caduceus,
a hand-made backward RNN), a Swin block rolls its map (``torch.roll``) to shift its windows. A site reading
such a tensor has the mask's shape on the same dims, but its padding sits elsewhere: masked as laid out,
its figures would leave data out and count padding, without a word.

`PositionOrder` marks, for the tensors of one forward pass (keyed by identity, weakly held) of a batch
whose mask leaves positions out, the reorderings (``torch.flip``/``fliplr``/``flipud``, ``torch.roll``)
along dims other than the channel dim that were not undone, by the sizes of the dims they moved: the
functional probe marks the result of one and carries marks through every op it sees, the Recorder through
the modules whose insides it does not see. A flip flipped back, a roll rolled back, leaves the tensor
unmarked; data that meets data in another order (an unmarked tensor of as many samples with a dim of a
reordered size, two different marks) is marked as mixed. At a site whose input is marked on sizes of the
mask's dims, the mask is moved as the positions were (`on_mask`, `deadneuron.probe.masks.moved_mask`): the
figures are those of the data without its padding, as elsewhere. Where that cannot be told (mixed; a size
two mask dims share, moved differently; positions flattened and reordered), the mask is not applied on that
call and the report names the site (`reorder_warnings`). Marks are host values only: nothing here reads a
tensor's data, so the hooks stay free of host synchronisation.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deadneuron.probe.masks import BatchMask

# One reordering not undone: ("flip", sizes of the flipped dims) or ("roll", ((size, shift), ...)), or
# ("mixed", sizes): reordered in a way that cannot be undone or told apart from the data beside it.
Step = tuple[str, tuple[Any, ...]]
Mark = tuple[Step, ...]
MaskStep = tuple[int, int]  # a mask dim and how its positions moved: -1 flipped, else rolled by that shift
Known = Callable[[torch.Tensor], "tuple[int, Any] | None"]

# Ops that move positions by a tensor of indices (a gather, an index_select, advanced indexing, a scatter):
# where they move them along a dim of the mask's sizes in a tensor of the batch's samples, the mask cannot
# follow without reading the indices (a host sync), so the result is marked mixed there.
INDEXING = frozenset({torch.gather, torch.Tensor.gather, torch.index_select, torch.Tensor.index_select,
                      torch.take_along_dim, torch.Tensor.take_along_dim, torch.Tensor.__getitem__,
                      torch.Tensor.__setitem__, torch.scatter, torch.Tensor.scatter, torch.Tensor.scatter_,
                      torch.index_copy, torch.Tensor.index_copy, torch.Tensor.index_copy_})  # fmt: skip
# reshapes: a sequence-first (L, N, ...) flattened into rows holds them in another order than a batch-first mask's
FLATTENING = frozenset({torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.flatten, torch.Tensor.flatten})
REORDERING = frozenset({torch.flip, torch.Tensor.flip, torch.fliplr, torch.Tensor.fliplr, torch.flipud,
                        torch.Tensor.flipud, torch.roll, torch.Tensor.roll}) | INDEXING | FLATTENING  # fmt: skip


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)) and depth < 2:
        for o in obj:
            yield from _tensors(o, depth + 1)


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _sizes(mark: Mark) -> set[int]:
    out: set[int] = set()
    for op, what in mark:
        if op == "roll":
            out.update(size for size, _ in what)
        else:
            out.update(what)
    return out


def _mixed(*marks: Mark) -> Mark:
    return (("mixed", tuple(sorted(set().union(*map(_sizes, marks))))),)


class PositionOrder:
    """The reorderings of positions not undone, per tensor of the current forward pass."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[weakref.ref[torch.Tensor], Mark]] = {}
        self.mask: BatchMask | None = None  # the batch's padding mask: followed only where it leaves positions out

    def reset(self) -> None:
        """Forget the tensors of the previous forward pass."""
        self.marks.clear()

    def mark_of(self, t: torch.Tensor) -> Mark | None:
        entry = self.marks.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _set(self, out: Any, mark: Mark) -> None:
        for t in _tensors(out):
            if mark:
                self.marks[id(t)] = (weakref.ref(t), mark)
            else:
                self.marks.pop(id(t), None)

    def reorder(self, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, known: Known) -> None:
        """``func`` (one of `REORDERING`) returned ``out``: its input's mark with this step added, or taken
        off where it undoes the last one. A step along the channel dim alone (``known``: the channel axis
        of a tensor) reorders no position."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input")
        if self.mask is None or self.mask.index is None or not isinstance(x, torch.Tensor):
            return
        if func in INDEXING:
            self._indexed(func, x, args, kwargs, out, known)
            return
        if func in FLATTENING:  # rows of a sequence-first tensor: mixed; else marks carried as by any op
            n, length = self.mask.shape[0], math.prod(self.mask.shape[1:])
            if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == n * length and n != length \
                    and x.dim() > 2 and x.shape[1] == n and x.shape[0] * n == out.shape[0]:  # fmt: skip
                self._set(out, _mixed(self.mark_of(x) or (), (("mixed", (n * length,)),)))
            elif self.marks:
                self.carry(args, kwargs, out)
            return
        if not isinstance(out, torch.Tensor):
            return
        before = self.mark_of(x) or ()
        step = _step(func, x, args, kwargs, known)
        if step is None:
            self._set(out, _mixed(before, (("mixed", tuple(x.shape)),)))
        elif not step[1] or (before and before[0][0] == "mixed"):
            self._set(out, before)
        elif before and before[-1] == _inverse(step):
            self._set(out, before[:-1])
        else:
            self._set(out, (*before, step))

    def _indexed(self, func: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any,
                 known: Known) -> None:  # fmt: skip
        """``func`` (one of `INDEXING`) read ``x`` and returned ``out`` (``x`` itself for ``__setitem__``, which
        returns None, and the in-place ops): where it moved positions by a tensor of indices along a dim of ``x``
        of one of the mask's sizes, ``x`` holding the batch's data (floating point, as many samples in its first
        or second dim: not a bool or integer mask indexed to build an attention mask), the result is mixed on
        those sizes; else it carries its inputs' marks as any op does. Moving whole samples (the samples' dim:
        the first where it has as many, else the second) is left alone: samples sorted by length are put back
        before a layer reads them (``pad_packed_sequence``)."""
        if func is torch.Tensor.__getitem__ and len(args) > 1 and _basic(args[1]):  # most indexing: first, cheaply
            if self.marks:
                self.carry(args, kwargs, out)
            return
        target = x if func is torch.Tensor.__setitem__ else out
        if not isinstance(target, torch.Tensor):
            return
        assert self.mask is not None
        shape = self.mask.shape
        sizes = {*shape[1:], math.prod(shape[1:])} if len(shape) > 2 else set(shape[1:])
        channel = known(x)
        # the samples' own dim left out: samples sorted by length and put back (pad_packed_sequence), not positions
        samples = 0 if x.shape[0] == shape[0] else 1
        dims = [d for d in _index_dims(func, x, args, kwargs) if d != samples and (channel is None or d != channel[0])]
        moved = {x.shape[d] for d in dims if x.shape[d] > 1}
        rows = math.prod(shape)  # the samples' positions flattened into rows, (N*L, C), moved as rows
        if x.is_floating_point() and ((shape[0] in x.shape[:2] and moved & sizes) or (x.shape[0] == rows and rows in moved)):
            self._set(target, _mixed(self.mark_of(x) or (), (("mixed", tuple(sorted(moved))),)))
        elif self.marks:
            self.carry(args, kwargs, target)

    def carry(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None, out: Any) -> None:
        """An op (or a module whose insides are not seen) read ``args`` and returned ``out``: where a marked
        tensor was among them, ``out`` takes its mark; mixed where marks differ, or where an unmarked tensor
        had a dim of a reordered size (data in the batch's order beside data reordered)."""
        if not self.marks:
            return
        given = [*args, *(kwargs.values() if kwargs else ())]
        found = [(t, self.mark_of(t)) for t in _tensors(given)]
        marked = [(t, m) for t, m in found if m is not None]
        if not marked:
            return
        marks = {m for _, m in marked}
        mark = marks.pop() if len(marks) == 1 else _mixed(*marks)
        sizes, batch = _sizes(mark), {t.shape[0] for t, _ in marked if t.dim()}
        if mark[0][0] != "mixed" and any(_aligned_data(t, m, sizes, batch) for t, m in found):
            mark = _mixed(mark)
        self._set(out, mark)

    def carry_module(self, args: tuple[Any, ...], out: Any) -> None:
        """A module returned ``out``: where the probe saw nothing inside it (a torch leaf, an activation module,
        an op no torch function reaches), ``out`` takes the reordering of its inputs (`carry`); an output the ops
        inside already marked keeps its mark. Cheap where no tensor is marked (it runs after every module)."""
        if not self.marks:
            return
        with torch._C.DisableTorchFunction():  # a hook: shapes read here must not pass through the probe
            if not any(self.mark_of(t) is not None for t in _tensors(out)):
                self.carry(args, None, out)

    def on_mask(self, z: torch.Tensor, mask_shape: tuple[int, ...]) -> tuple[MaskStep, ...] | None:
        """How ``z``'s positions were reordered, as steps on the dims of a mask of ``mask_shape`` (told by their
        sizes: ``()`` where none of them was reordered), or None where that cannot be told (mixed; a size that
        more than one mask dim has, reordered on some of them, or on all but by different shifts; the mask's
        positions flattened into one dim, as grid cells into tokens, and reordered there)."""
        mark = self.mark_of(z) if self.marks else None
        flat = math.prod(mask_shape[1:]) if len(mask_shape) > 2 else None
        rows = math.prod(mask_shape) if math.prod(mask_shape) not in mask_shape else None  # samples' positions as rows
        sizes = _sizes(mark) if mark is not None else set()
        if not sizes.intersection(mask_shape) and flat not in sizes and rows not in sizes:
            return ()
        steps: list[MaskStep] = []
        for op, what in mark or ():
            moves = _sizes(((op, what),))
            if op == "mixed" or (flat in moves and flat not in mask_shape) or rows in moves:
                return None
            moved: dict[int, list[int]] = {}
            for size, shift in what if op == "roll" else ((s, -1) for s in what):
                moved.setdefault(size, []).append(shift)
            for size, shifts in moved.items():
                dims = [j for j, s in enumerate(mask_shape) if s == size]
                if dims and (len(dims) != len(shifts) or len(set(shifts)) > 1):
                    return None
                steps += [(j, shifts[0]) for j in dims]
        return tuple(steps)


def _aligned_data(t: torch.Tensor, mark: Mark | None, sizes: set[int], batch: set[int]) -> bool:
    """Whether ``t``, unmarked, holds data in the batch's order beside reordered data: not a parameter, as many
    samples as a marked tensor beside it, a dim of a reordered size."""
    return mark is None and not isinstance(t, torch.nn.Parameter) and t.dim() > 1 and t.shape[0] in batch \
        and bool(sizes.intersection(t.shape[1:]))


def _step(func: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any], known: Known) -> Step | None:
    """The step ``func`` takes on ``x`` (sizes of the dims it reorders, the channel dim and dims of size 1
    left out), or None where its dims cannot be read (a roll over the flattened tensor)."""
    n = x.dim()
    name = getattr(func, "__name__", "")
    if name == "fliplr":
        dims: tuple[int, ...] | None = (1,)
    elif name == "flipud":
        dims = (0,)
    elif name == "flip":
        rest = args[1:]
        dims = _ints(rest[0] if len(rest) == 1 else rest) if rest else _ints(kwargs.get("dims"))
    else:
        shifts = _ints(args[1] if len(args) > 1 else kwargs.get("shifts"))
        dims = _ints(args[2] if len(args) > 2 else kwargs.get("dims"))
        if shifts is None or dims is None or len(shifts) != len(dims) or not all(-n <= d < n for d in dims):
            return None
        channel = known(x)
        moved = [(x.shape[d], s % x.shape[d]) for d, s in zip(dims, shifts, strict=True)
                 if x.shape[d] > 1 and s % x.shape[d] and (channel is None or d % n != channel[0])]  # fmt: skip
        return "roll", tuple(sorted(moved))
    if dims is None or not all(-n <= d < n for d in dims):
        return None
    channel = known(x)
    return "flip", tuple(sorted(x.shape[d] for d in dims if x.shape[d] > 1 and (channel is None or d % n != channel[0])))


_BASIC = (int, slice, type(None), type(Ellipsis))


def _basic(index: Any) -> bool:
    """Whether an indexing expression is basic indexing alone (ints, slices, None, Ellipsis): it moves no position."""
    return type(index) in _BASIC or (type(index) is tuple and all(type(i) in _BASIC for i in index))


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _index_dims(func: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[int]:
    """The dims of ``x`` along which ``func`` (one of `INDEXING`) moves positions by a tensor of indices
    (every dim where it reads ``x`` flattened; none for basic indexing: ints, slices, None, Ellipsis)."""
    n = x.dim()
    name = getattr(func, "__name__", "")
    if name == "__setitem__":
        value = _arg(args, kwargs, 2, "value")
        if not (isinstance(value, torch.Tensor) and value.dim()):
            return []  # a value set (x[~mask] = 0): no position of another tensor lands in x
    if name in ("__getitem__", "__setitem__"):
        return _advanced_dims(_arg(args, kwargs, 1, "index"), n)
    if name == "take_along_dim":
        dim = _arg(args, kwargs, 2, "dim")
    else:
        dim = _arg(args, kwargs, 1, "dim")
        if name.startswith("scatter") and not isinstance(_arg(args, kwargs, 3, "src"), torch.Tensor):
            return []  # a value scattered: no position of another tensor lands in x
    if dim is None:
        return list(range(n))
    return [dim % n] if isinstance(dim, int) and -n <= dim < max(n, 1) else list(range(n))


def _advanced_dims(index: Any, n: int) -> list[int]:
    """The dims of an ``n``-D tensor that ``index`` (an indexing expression) indexes with integer tensors or
    lists. A bool index selects positions in their order (packing valid tokens): it moves none."""
    items = index if isinstance(index, tuple) else (index,)

    def span(i: Any) -> int:  # dims of x an item consumes (Ellipsis: counted apart)
        if i is None or i is Ellipsis:
            return 0
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            return max(i.dim(), 1)
        return 1

    rest = n - sum(span(i) for i in items)
    dims: list[int] = []
    pos = 0
    for i in items:
        if i is Ellipsis:
            pos += max(rest, 0)
            continue
        k = span(i)
        if (isinstance(i, torch.Tensor) and i.dim() > 0 and i.dtype != torch.bool) or isinstance(i, (list, range)):
            dims += [d for d in range(pos, pos + k) if d < n]
        pos += k
    return dims


def _inverse(step: Step) -> Step:
    if step[0] == "roll":
        return "roll", tuple(sorted((size, -shift % size) for size, shift in step[1]))
    return step


def reorder_warnings(named: Iterable[tuple[str, Any]]) -> list[str]:
    """A warning per site (``named``: each site's name and running state) where the padding mask was not
    applied on some calls because the site's positions were reordered."""
    return [f"site {name!r} (input {tuple(site.shape)}): its input's positions were reordered inside the forward pass "
            f"(a torch.flip or torch.roll not undone before it, positions moved by a tensor of indices: a gather, "
            f"an index_select, x[:, idx], or a sequence-first tensor flattened into rows), so the padding mask, laid out "
            f"in the batch's order, "
            f"was not applied on {site.reordered} of its {site.calls} calls: its figures count the padding there"
            for name, site in named if site.reordered]  # fmt: skip


__all__ = ["INDEXING", "REORDERING", "PositionOrder", "reorder_warnings"]
