"""Where a padding mask lies on a site's tensor: which of its dims are the mask's (N, positions...).

A mask of shape (N, positions...) is placed on the dims of an activation other than its channel dim:

* batch first (the common case): those dims begin with exactly the mask's shape (tokens (N, L, C) under
  an (N, L) mask, conv maps (N, C, H, W) under (N, H, W)), or with (N, product of the positions) where a
  grid was flattened into tokens ((N, H*W, C) under (N, H, W));
* sequence first: they begin with the positions, then N (``nn.TransformerEncoder(batch_first=False)``
  and ``nn.MultiheadAttention`` read (L, N, C) under an (N, L) mask);
* flattened: where neither fits and the tensor is rows of channels, its rows are N x positions, as
  ``reshape(-1, C)`` of a batch-first (N, L, C) lays them out (Hugging Face's OPT runs its feed-forward on (N*L, C)); the report says so (a
  tensor flattened sequence first, (L, N, C).reshape(-1, C), would need the mask left out).

A placement is read off the shapes only where one of them fits. Where both fit (a sequence-first model
whose batch holds as many samples as positions: N == L), the shapes cannot tell. A placement then comes
from the user (``mask_dims``: per site glob, the tensor dims the mask's dims lie on, in the mask's order),
else from another call of the same site whose shapes told it, else it is a guess (batch first) that the
report names, with the way to state it (`placement_warning`). Pure: shapes in, placements out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from deadneuron.errors import UsageError
from deadneuron.probe.batched import vmap_warnings
from deadneuron.probe.order import reorder_warnings
from deadneuron.select import matches

How = Literal["shape", "stated", "adapter", "guessed", "misplaced", "flattened"]


@dataclass(frozen=True)
class Placement:
    """The tensor dims the mask's dims lie on, in the mask's order (where the positions were flattened
    into one dim: the batch dim, then that dim), and whether they are the first dims other than the
    channel, in order (batch first: the tensor is read as it is laid out)."""

    dims: tuple[int, ...]
    leading: bool
    flattened: bool = False  # one dim holding N x positions, batch first
    fold: int = 1  # rows per sample in the batch dim (stated only: sample n's at rows n*fold ... n*fold + fold - 1)


@dataclass(frozen=True)
class MaskPlacement:
    """How a site's mask placement was decided, where a choice was made (reported): ``shape`` (one
    placement fitted, other than batch first), ``flattened`` (the positions flattened into one dim), ``stated`` (``mask_dims``), ``guessed`` (several fitted and no
    call told which; ``options`` lists them) or ``misplaced`` (guessed on some calls, and a later call's
    shapes fitted another placement, ``options[0]``: the guessed calls were masked on the wrong dims)."""

    dims: tuple[int, ...]
    how: How
    options: tuple[tuple[int, ...], ...] = ()
    fold: int = 1  # rows per sample in the batch dim (`Placement.fold`)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"dims": list(self.dims), "how": self.how, "options": [list(o) for o in self.options]}
        return {**out, "fold": self.fold} if self.fold > 1 else out


def _rest(ndim: int, axis: int) -> list[int]:
    return [d for d in range(ndim) if d != axis]


def placements(shape: tuple[int, ...] | torch.Size, axis: int, mask_shape: tuple[int, ...]) -> tuple[Placement, ...]:
    """Every placement of a mask of ``mask_shape`` on a tensor of ``shape`` whose channel dim is ``axis``
    (batch first before sequence first). The positions must not fit dims further on as well: where they
    do, which dims are the positions cannot be told (attention scores (N, heads, L, L) read on heads; a
    decoder's (N, K, H, W, C) whose K slots equal H = W), and that placement is left out, so that such a
    site is not masked rather than masked on the wrong dims."""
    if not shape or not mask_shape:
        return ()
    axis %= len(shape)
    index = _rest(len(shape), axis)
    rest = tuple(shape[d] for d in index)
    k, positions = len(mask_shape), tuple(mask_shape[1:])
    found = []
    if len(rest) >= k and rest[:k] == tuple(mask_shape):
        repeated = any(rest[1 + s : 1 + s + len(positions)] == positions for s in range(1, len(rest) - len(positions)))
        if not (positions and repeated):
            found.append(Placement(tuple(index[:k]), True))
    elif len(positions) > 1 and len(rest) >= 2 and rest[:2] == (mask_shape[0], math.prod(positions)):
        found.append(Placement(tuple(index[:2]), True))
    if positions and len(rest) >= k and rest[:k] == (*positions, mask_shape[0]):
        repeated = any(rest[s : s + len(positions)] == positions for s in range(k, len(rest) - len(positions) + 1))
        if not repeated:
            found.append(Placement((index[k - 1], *index[: k - 1]), False))
    if not found and k > 1 and len(rest) == 1 and rest[0] == math.prod(mask_shape):  # rows (N*L, C) only
        found.append(Placement((index[0],), True, flattened=True))
    return tuple(found)


def _runs(shape: tuple[int, ...] | torch.Size, axis: int, mask_shape: tuple[int, ...]) -> tuple[list[int], tuple[int, ...], list[int]]:
    """The dims of ``shape`` other than the channel, their sizes, and where among them (after the first) a run
    of the mask's positions' sizes starts."""
    index = _rest(len(shape), axis % len(shape))
    rest, positions = tuple(shape[d] for d in index), tuple(mask_shape[1:])
    return index, rest, [s for s in range(1, len(rest) - len(positions) + 1) if rest[s : s + len(positions)] == positions]


def repeated_placement(shape: tuple[int, ...] | torch.Size, axis: int, mask_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Where a mask that `placements` does not place lies on ``shape`` with other dims between its batch dim and
    its positions (the mask repeated over them: a spatial-broadcast decoder's slots (N, K, H, W, C) under an
    (N, H, W) mask, heads (N, heads, L, D) under (N, L)): the batch dim, then the one run of dims holding the
    positions, not the next dim; None where there is no such run, or more than one (K == H == W, pairs (N, L, L,
    C)). A suggestion for the user to state (`StatedDims`), never applied of itself: that the dims between
    repeat the mask is what the shapes cannot tell."""
    if len(mask_shape) < 2 or not shape:
        return None
    index, rest, starts = _runs(shape, axis, mask_shape)
    if not rest or rest[0] != mask_shape[0] or len(starts) != 1 or starts[0] == 1:
        return None
    return (index[0], *index[starts[0] : starts[0] + len(mask_shape) - 1])


def folded_positions(shape: tuple[int, ...] | torch.Size, axis: int, mask_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The dims of ``shape`` holding a mask's positions, where its batch dim holds a multiple of the mask's N
    (slots or views folded into the batch: a decoder's (N*K, C, H, W) under an (N, H, W) mask), the positions
    once; None otherwise. The shapes place no mask there (the order of the folded rows is unknown); a stated one
    can (`stated_placement`, ``fold``)."""
    if len(mask_shape) < 2 or not shape:
        return None
    index, rest, starts = _runs(shape, axis, mask_shape)
    n = mask_shape[0]
    if not rest or n < 1 or rest[0] <= n or rest[0] % n or len(starts) != 1:
        return None
    return tuple(index[starts[0] : starts[0] + len(mask_shape) - 1])


def stated_placement(dims: tuple[int, ...], shape: tuple[int, ...] | torch.Size, axis: int,
                     mask_shape: tuple[int, ...]) -> Placement | None:  # fmt: skip
    """The user's ``dims`` as a placement on ``shape``, or None where the sizes there are not the mask's. A batch
    dim of a multiple of the mask's N holds that many rows per sample, each sample's in turn (slots folded into
    the batch as ``reshape`` lays out an (N, K, ...)): the mask is repeated so (``fold``)."""
    axis %= len(shape)
    if any(d >= len(shape) for d in dims):
        return None
    sizes, leading = tuple(shape[d] for d in dims), tuple(_rest(len(shape), axis)[: len(dims)]) == dims
    if sizes == tuple(mask_shape):
        return Placement(dims, leading)
    if sizes[1:] == tuple(mask_shape[1:]) and mask_shape[0] and sizes[0] > mask_shape[0] and not sizes[0] % mask_shape[0]:
        return Placement(dims, leading, fold=sizes[0] // mask_shape[0])
    return None


def check_stated(dims: tuple[int, ...], *, site: str, glob: str, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``dims`` set for ``glob`` as dims of a site's tensor of ``shape`` (channel dim ``axis``): distinct,
    in range (negative counts from the end), not the channel dim; a UsageError naming them otherwise."""
    n = len(shape)
    where = f"mask dims {','.join(map(str, dims))} set for {glob!r} at site {site!r} (input {tuple(shape)})"
    if not dims or any(not -n <= d < n for d in dims):
        raise UsageError(f"{where}: give dims in [-{n}, {n - 1}], one per dim of the mask (N first)")
    out = tuple(d % n for d in dims)
    if len(set(out)) != len(out) or axis % n in out:
        raise UsageError(f"{where}: the dims must differ from each other and from the channel dim {axis % n}")
    return out


@dataclass
class SitePlacement:
    """A site's mask placement across calls (kept for the site's life, across monitor windows)."""

    stated: tuple[int, ...] | None = None  # the user's dims for this site (or its adapter's: ``implied``)
    implied: bool = False
    fold: int = 1  # rows per sample a stated placement took (`Placement.fold`)
    site: str = ""  # its name, for messages
    known: Placement | None = None  # the placement a call's shapes told
    guess: Placement | None = None  # the placement used on calls whose shapes could not tell
    options: tuple[Placement, ...] = ()  # the placements those shapes allowed
    repeated: tuple[tuple[int, ...] | None, tuple[int, ...]] | None = None  # unplaced: dims to suggest, the mask's shape
    _cache: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[Placement, ...]] = field(default_factory=dict, repr=False)

    def choose(self, shape: tuple[int, ...] | torch.Size, axis: int,
               mask_shape: tuple[int, ...]) -> tuple[Placement | None, tuple[Placement, ...]]:  # fmt: skip
        """The placement of a call's tensor of ``shape`` (None: the mask does not fit it) and, where it is a
        guess, the placements the shapes allowed (else ``()``). Host arithmetic on shapes only (it runs
        inside the hooks)."""
        if self.stated is not None:
            if len(self.stated) != len(mask_shape):
                raise UsageError(f"mask dims {','.join(map(str, self.stated))} set for site {self.site!r} name "
                                 f"{len(self.stated)} dims, but the mask has shape {tuple(mask_shape)}: give one "
                                 "dim of the site's input per mask dim, N first")  # fmt: skip
            place = stated_placement(self.stated, shape, axis, mask_shape)
            self.fold = place.fold if place is not None and place.fold > 1 else self.fold
            return place, ()
        key = (tuple(shape), tuple(mask_shape))
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= 16:
                self._cache.clear()
            found = self._cache[key] = placements(shape, axis, mask_shape)
        if len(found) == 1:
            self.known = self.known or found[0]
            return found[0], ()
        if not found:
            if self.repeated is None:  # the dims to suggest, from the first such call (`repeated_placement`)
                self.repeated = (repeated_placement(shape, axis, mask_shape), tuple(mask_shape))
            return None, ()
        if self.known in found:
            return self.known, ()
        return found[0], found

    def guessed(self, used: Placement, options: tuple[Placement, ...]) -> None:
        """Note a call placed by a guess (one that left padding out: elsewhere the placement changes nothing)."""
        self.guess = self.guess or used
        self.options = self.options or options

    def result(self) -> MaskPlacement | None:
        """What the report says of this site's placement: None where the shapes placed it batch first."""
        if self.stated is not None:
            return MaskPlacement(self.stated, "adapter" if self.implied else "stated", fold=self.fold)
        if self.guess is not None and self.known != self.guess:
            if self.known is not None:
                return MaskPlacement(self.guess.dims, "misplaced", (self.known.dims,))
            return MaskPlacement(self.guess.dims, "guessed", tuple(p.dims for p in self.options))
        if self.known is not None and (self.known.flattened or not self.known.leading):
            return MaskPlacement(self.known.dims, "flattened" if self.known.flattened else "shape")
        return None


class StatedDims:
    """The user's ``mask_dims`` (site glob -> the tensor dims the mask's dims lie on, in the mask's order),
    matched against each new site's names, as channel-axis overrides are."""

    def __init__(self, mask_dims: Mapping[str, Sequence[int]] | None = None, *,
                 implied: Mapping[str, Sequence[int]] | None = None) -> None:  # fmt: skip
        """``implied``: an adapter's own placements (its ``mask_dims``), after the user's, not warned of where
        they match no site (a ``select`` leaving those sites out)."""
        if mask_dims is not None and not isinstance(mask_dims, Mapping):
            raise UsageError(f"mask_dims takes {{site glob: (dim, ...)}}, not a {type(mask_dims).__name__}")
        self.dims: dict[str, tuple[int, ...]] = {}
        self.quiet = {glob for glob in implied or {} if glob not in (mask_dims or {})}
        for glob, dims in {**(mask_dims or {}), **{g: (implied or {})[g] for g in self.quiet}}.items():
            ints = isinstance(dims, Sequence) and not isinstance(dims, str) and all(
                isinstance(d, int) and not isinstance(d, bool) for d in dims)  # fmt: skip
            if not isinstance(glob, str) or not ints or not dims:
                raise UsageError(f"mask_dims[{glob!r}] = {dims!r}: give a site glob -> its dims under the mask's "
                                 "dims, in the mask's order (N first), e.g. {'encoder.*': (1, 0)} for (L, N, C)")
            self.dims[glob] = tuple(dims)
        self.matched: set[str] = set()

    def of(self, names: tuple[str, ...], shape: tuple[int, ...], axis: int) -> tuple[tuple[int, ...] | None, bool]:
        """The dims set for the site called ``names`` (first matching glob), checked against its input's
        ``shape`` and channel dim, None where no glob matches; and whether the adapter set them."""
        for glob, dims in self.dims.items():
            if matches(names, (glob,)):
                self.matched.add(glob)
                return check_stated(dims, site=names[0], glob=glob, shape=shape, axis=axis), glob in self.quiet
        return None, False

    def warnings(self, named: Sequence[tuple[str, Any]]) -> list[str]:
        """The globs that matched no site, and a warning per site whose placement was guessed or wrong, or
        where positions reordered kept the mask off (``named``: each site's name and running state,
        `deadneuron.probe.site.Site`)."""
        out = [f"mask dims set for {glob!r} matched no site: check the name against the site table"
               for glob in self.dims if glob not in self.matched and glob not in self.quiet]  # fmt: skip
        for name, site in named:
            placed = site.placement.result()
            warning = placement_warning(name, site.shape, placed) if placed is not None else None
            out += [warning] if warning is not None else []
            stated = site.placement.stated
            if stated is not None and site.unfitted and not site.masked:  # as set, and never where it fits
                out.append(f"site {name!r} (input {tuple(site.shape)}): the mask dims set for it, {_dims(stated)}, fit "
                           "no batch's padding mask, so its padding is counted; check them against its input's shape")
        return out + repeated_warnings(named) + reorder_warnings(named) + vmap_warnings(named)


def repeated_warnings(named: Sequence[tuple[str, Any]]) -> list[str]:
    """Per placement, the sites never masked where the mask's positions lie after other dims
    (`repeated_placement`): their padding is counted; the warning names the dims that would leave it out."""
    found: dict[tuple[tuple[int, ...], tuple[int, ...], int], list[tuple[str, Any]]] = {}
    for name, site in named:
        seen = site.placement.repeated
        if seen is not None and seen[0] is not None and not site.masked and site.placement.stated is None:
            found.setdefault((seen[0], tuple(site.shape), site.axis % len(site.shape)), []).append((name, seen[1]))
    out = _folded_warnings(named)
    for (dims, shape, axis), sites in found.items():
        first, mask_shape = sites[0]
        names = ", ".join(repr(n) for n, _ in sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
        between = [d for d in range(dims[0] + 1, dims[1]) if d != axis]
        held = f"dim{'s' if len(between) > 1 else ''} {', '.join(map(str, between))}"
        out.append(f"padding is counted at {names} (input {shape}): the mask ({', '.join(map(str, mask_shape))}) fits "
                   f"dims {_dims(dims)}, with {held} between, and masks are placed on leading dims only; if it repeats "
                   f"over {held} (as over a spatial-broadcast decoder's slots), state it: mask_dims={{{first!r}: "
                   f"{_dims(dims)}}} (deadneuron.audit, Monitor) or --mask-dims '{first}={','.join(map(str, dims))}' "
                   "(deadneuron audit), per site or glob")
    return out


def _folded_warnings(named: Sequence[tuple[str, Any]]) -> list[str]:
    """The sites never masked whose batch dim folds several rows per sample over the mask's positions
    (`folded_positions`), one warning for all."""
    found = []
    for name, site in named:
        seen = site.placement.repeated
        if seen is not None and seen[0] is None and not site.masked and site.placement.stated is None:
            dims = folded_positions(tuple(site.shape), site.axis, seen[1])
            if dims is not None:
                first = next(d for d in range(len(site.shape)) if d != site.axis % len(site.shape))  # the batch dim
                found.append((name, tuple(site.shape), dims, seen[1], first))
    if not found:
        return []
    name, shape, dims, mask_shape, first = found[0]
    batch, place = shape[first], (first, *dims)
    others = f" and {len(found) - 1} more site{'s' if len(found) > 2 else ''}" if len(found) > 1 else ""
    return [f"padding is counted at {name!r} (input {shape}){others}: dims {_dims(dims)} have the sizes of the padding "
            f"mask's positions ({', '.join(map(str, mask_shape[1:]))}), but the batch dim holds {batch // mask_shape[0]} "
            f"rows per sample ({batch} for the mask's {mask_shape[0]}: slots or views folded into the batch), in an "
            f"order the shapes do not tell; if sample n's are rows n*{batch // mask_shape[0]} on (as reshape lays out "
            f"an (N, K, ...)), state it: mask_dims={{{name!r}: {_dims(place)}}} (deadneuron.audit, Monitor) or "
            f"--mask-dims '{name}={','.join(map(str, place))}' (deadneuron audit), per site or glob"]


def _dims(dims: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, dims))})"


def placement_warning(site: str, shape: tuple[int, ...], placed: MaskPlacement) -> str | None:
    """The warning of a guessed or wrong placement at ``site`` (one per site), naming the dims used and
    how to state the placement; None for the other placements."""
    if placed.how not in ("guessed", "misplaced"):
        return None
    others = [o for o in placed.options if o != placed.dims] or [placed.dims]
    other, used = others[0], placed.dims
    state = (f"mask_dims={{{site!r}: {_dims(other)}}} (deadneuron.audit, Monitor) or --mask-dims "
             f"'{site}={','.join(map(str, other))}' (deadneuron audit); '{site}={','.join(map(str, used))}' keeps "
             f"dims {_dims(used)} and silences this")
    if placed.how == "misplaced":
        return (f"site {site!r} (input {tuple(shape)}): on batches whose shapes could not tell where the padding "
                f"mask lies, it was placed on dims {_dims(used)}, but other batches fit it on dims {_dims(other)} "
                f"only, so the figures of those batches left out the wrong elements; state it: {state}")
    listed = " or ".join(_dims(o) for o in placed.options)
    return (f"site {site!r} (input {tuple(shape)}): the padding mask fits dims {listed} (batch first or "
            f"sequence first) and no batch's shapes told which; dims {_dims(used)} were used: if the layer reads "
            f"its input the other way, its figures left out the wrong elements; state it: {state}")


__all__ = ["MaskPlacement", "Placement", "SitePlacement", "StatedDims", "check_stated", "folded_positions",
           "placement_warning", "placements", "repeated_placement", "repeated_warnings", "stated_placement"]
