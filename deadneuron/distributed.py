"""Audits across processes: every rank's statistics merged exactly into one result (DESIGN section 8).

With a process group initialised (torchrun, or `torch.distributed.init_process_group`) and more than
one rank, `deadneuron.audit` measures its own shard of the data, then merges with every other rank;
every rank returns the same Report, equal to one process's audit of all the data:

    counts: n, zero, flat, finite, calls, excluded elements, histogram bins,
            slot statistics, adapter metric sums, batches, samples        SUM (all_reduce)
    min / max                                                           MIN / MAX (all_reduce)
    mean and M2 per channel (with its finite count)   all_gather, then Chan's formula in rank order

The moments are never summed as raw power sums (a sum of squares loses the std of a channel whose
mean is large): gathered rows are merged the way one process merges its batches. The gather runs in
chunks of channels, so memory per rank stays O(channels) whatever the world size.

Before any statistic moves, each rank sends a small `Header` (its sites, slot and metric layout,
warnings, or its error). Ranks that saw different sites stop with a UsageError naming what each
lacked; a rank that saw no batch contributes nothing (its rows are the identity of every merge); a
rank whose audit failed makes every rank raise, naming it (`share_failure`).

`merge_parts` is the pure form (Parts in, one Part out: testable without processes) and
`all_reduce_part` the collective one; both run the same layout, packing and merge code.
`reduce_recorder` merges a Recorder's sites across ranks: a Monitor's snapshot calls it on every rank,
at the same step, in place of ``rec.results()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from deadneuron import errors
from deadneuron.errors import AuditRuntimeError, DeadneuronError, UsageError
from deadneuron.moments import merge_moments_
from deadneuron.part import Part, SiteInfo, SiteState
from deadneuron.stats import HISTOGRAM_EDGES, ChannelStats, ValueHistogram

if TYPE_CHECKING:
    from deadneuron.probe import Recorder, SiteResult
    from deadneuron.probe.placement import MaskPlacement
    from deadneuron.slots import SlotParams

_BINS = len(HISTOGRAM_EDGES) + 2  # `ValueHistogram.counts`: the bins and the non-finite bin
_COUNTERS = 6  # per site: calls, excluded, unfitted, masked, histogram sampled, reordered
_GATHER_BUDGET = 1 << 24  # float64 elements gathered at a time (128 MiB), whatever the world size


@dataclass(frozen=True)
class Header:
    """What a rank tells the others before any statistic moves: small and picklable."""

    rank: int
    batches: int
    sites: tuple[SiteInfo, ...] = ()
    histograms: bool = False
    slots: tuple[int, SlotParams] | None = None
    metrics: tuple[tuple[str, tuple[int, ...]], ...] = ()
    warnings: tuple[str, ...] = ()
    mask: tuple[str, tuple[int, ...]] | None = None
    error: tuple[str, str] | None = None  # (exception class name, message)


@dataclass(frozen=True)
class Layout:
    """The merged layout every rank packs its state into: the reference rank's sites in its order."""

    sites: tuple[SiteInfo, ...] = ()
    histograms: bool = False
    slots: tuple[int, SlotParams] | None = None
    metrics: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass
class Packed:
    """A Part as three flat tensors: ``sums`` add across ranks, ``mins`` take the minimum (maxima are
    stored negated), ``moments`` (3, channels) = (finite count, mean, M2) merge by Chan's formula."""

    sums: torch.Tensor
    mins: torch.Tensor
    moments: torch.Tensor


def header_of(part: Part, rank: int) -> Header:
    return Header(
        rank=rank, batches=part.batches, sites=tuple(s.info for s in part.sites),
        histograms=any(s.histogram is not None for s in part.sites),
        slots=(part.slots.num_slots, part.slots.params) if part.slots is not None else None,
        metrics=tuple((k, tuple(v.shape)) for k, v in part.metric_sums.items()),
        warnings=tuple(part.warnings), mask=part.mask,
    )  # fmt: skip


def failure_header(exc: BaseException, rank: int) -> Header:
    message = (str(exc).strip().splitlines() or [""])[0]
    return Header(rank=rank, batches=0, error=(type(exc).__name__, message))


# -- agreeing on a layout ------------------------------------------------------------------------------


def agree(headers: Sequence[Header]) -> Layout:
    """The layout of the merge, or the error every rank raises: a rank failed, or ranks saw different
    sites, slot counts or metric shapes. Ranks without a batch are left out of every check."""
    _raise_failures(headers)
    seen = [h for h in headers if h.batches > 0]
    if not seen:
        return Layout()
    ref = seen[0]
    for h in seen[1:]:
        _check_sites(ref, h)
        if h.histograms != ref.histograms:
            raise UsageError(f"rank {h.rank} and rank {ref.rank} differ in histograms=: audit with the same arguments on every rank")
    last = max(seen, key=lambda h: (h.batches, h.rank))  # under strided sharding: the stream's last batch
    shapes = {i.key: i.shape for i in last.sites}
    sites = tuple(replace(i, shape=shapes[i.key], mask_placement=_placement(seen, i.key)) for i in ref.sites)
    return Layout(sites, ref.histograms, _agree_slots(seen), _agree_metrics(seen))


def _placement(seen: Sequence[Header], key: tuple[Any, ...]) -> MaskPlacement | None:
    """A site's mask placement over the ranks: the one that most needs saying (a wrong or guessed one first)."""
    found = [i.mask_placement for h in seen for i in h.sites if i.key == key and i.mask_placement is not None]
    order = ("misplaced", "guessed", "stated", "adapter", "flattened", "shape")
    return min(found, key=lambda p: order.index(p.how), default=None)


def _raise_failures(headers: Sequence[Header]) -> None:
    failed = [h for h in headers if h.error is not None]
    if not failed:
        return
    h = failed[0]
    assert h.error is not None
    name, message = h.error
    cls = getattr(errors, name, None)
    more = f" (ranks {', '.join(str(f.rank) for f in failed[1:])} failed too)" if len(failed) > 1 else ""
    if isinstance(cls, type) and issubclass(cls, DeadneuronError):
        raise cls(f"rank {h.rank}: {message}{more}")
    raise AuditRuntimeError(f"rank {h.rank} failed: {name}: {message}{more}")


def _names(infos: Sequence[SiteInfo]) -> str:
    shown = ", ".join(i.name for i in infos[:4])
    return shown + (f" and {len(infos) - 4} more" if len(infos) > 4 else "")


def _check_sites(ref: Header, h: Header) -> None:
    want = {i.key: i for i in ref.sites}
    have = {i.key: i for i in h.sites}
    lacks = [i for k, i in want.items() if k not in have]
    extra = [i for k, i in have.items() if k not in want]
    if lacks or extra:
        parts = [f"rank {h.rank} did not see {_names(lacks)}"] if lacks else []
        parts += [f"rank {h.rank} saw {_names(extra)}, which rank {ref.rank} did not"] if extra else []
        raise UsageError(
            f"ranks saw different activation sites ({'; '.join(parts)}), so their statistics cannot be merged: "
            "run the same branches of the model on every rank, or audit each rank alone with distributed=False"
        )
    for key, info in want.items():
        if have[key].channels != info.channels:
            raise UsageError(f"site {info.name} has {info.channels} channels on rank {ref.rank} and "
                             f"{have[key].channels} on rank {h.rank}: the ranks run different models")  # fmt: skip


def _agree_slots(seen: Sequence[Header]) -> tuple[int, SlotParams] | None:
    found = {h.slots for h in seen if h.slots is not None}
    if len(found) > 1:
        raise UsageError(f"ranks found different slot masks ({', '.join(f'{k} slots' for k, _ in found)}): the ranks run different models")
    return next(iter(found), None)


def _agree_metrics(seen: Sequence[Header]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes: dict[str, tuple[int, ...]] = {}
    for h in seen:
        for key, shape in h.metrics:
            if shapes.setdefault(key, shape) != shape:
                raise UsageError(f"adapter metric {key!r} has shape {shapes[key]} on one rank and {shape} on rank {h.rank}")
    return tuple(shapes.items())


# -- packing, merging, unpacking -----------------------------------------------------------------------


def pack(part: Part, layout: Layout, device: torch.device) -> Packed:
    """``part`` in ``layout``'s order on ``device``; what it lacks (a rank without a batch, a batch without
    slot masks) is the identity of the merge: zero counts, +inf minima, empty moments."""
    from deadneuron.slots import SlotStats

    f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
    mine = {s.info.key: s for s in part.sites} if part.batches > 0 else {}
    sums, mins, moments = [], [], []
    for info in layout.sites:
        s = mine.get(info.key) or SiteState(info, ChannelStats(info.channels, device))
        acc = s.stats.acc.to(device)
        sampled = s.histogram is not None and s.histogram.sampled
        sums += [acc[0], acc[1], s.stats.counts.to(device),
                 torch.tensor([s.calls, s.excluded, s.unfitted, s.masked, sampled, s.reordered], **f64)]  # fmt: skip
        if layout.histograms:
            sums.append(s.histogram.counts.to(device).double() if s.histogram is not None else torch.zeros(_BINS, **f64))
        mins += [acc[5], -acc[6]]
        moments.append(acc[2:5])
    if layout.slots is not None:
        slots = part.slots if part.slots is not None and part.batches > 0 else SlotStats(layout.slots[0], params=layout.slots[1])
        sums += [v.to(device).double().reshape(-1) for v in slots.state.values()]
    for key, shape in layout.metrics:
        value = part.metric_sums.get(key) if part.batches > 0 else None
        sums.append(value.to(device).double().reshape(-1) if value is not None else torch.zeros(_numel(shape), **f64))
    sums.append(torch.tensor([part.batches, part.samples], **f64))
    return Packed(torch.cat(sums), _cat(mins, f64), torch.cat(moments, 1) if moments else torch.zeros(3, 0, **f64))


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _cat(rows: list[torch.Tensor], f64: dict[str, Any]) -> torch.Tensor:
    return torch.cat(rows) if rows else torch.zeros(0, **f64)


def merge_moment_rows(rows: torch.Tensor) -> torch.Tensor:
    """(ranks, 3, channels) rows of (finite count, mean, M2) merged in rank order (Chan's formula)."""
    acc = rows[0].clone()
    for other in rows[1:]:
        merge_moments_(acc[0], acc[1], acc[2], other[0], other[1], other[2])
    return acc


def unpack(packed: Packed, layout: Layout, headers: Sequence[Header]) -> Part:
    """The merged Part: every site's accumulators rebuilt from the merged rows, warnings (of the ranks
    that saw a batch) in rank order without repeats, the first padding mask named."""
    from deadneuron.slots import SlotStats

    sums, mins = _Reader(packed.sums), _Reader(packed.mins)
    sites, offset = [], 0
    for info in layout.sites:
        c = info.channels
        zero, flat, counts, counters = sums.take(c), sums.take(c), sums.take(2), sums.take(_COUNTERS).tolist()
        calls, excluded, unfitted, masked, sampled, reordered = (round(x) for x in counters)
        stats = ChannelStats(c, packed.sums.device)
        moments = packed.moments[:, offset : offset + c]
        offset += c
        stats.acc = torch.stack([zero, flat, moments[0], moments[1], moments[2], mins.take(c), -mins.take(c)])
        stats.counts = counts.clone()
        histogram = None
        if layout.histograms:
            histogram = ValueHistogram(packed.sums.device)
            histogram.counts, histogram.sampled = sums.take(_BINS).round().long(), sampled > 0
        sites.append(SiteState(info, stats, histogram, calls, masked > 0, excluded, unfitted, reordered))
    slots = None
    if layout.slots is not None:
        slots = SlotStats(layout.slots[0], params=layout.slots[1], device=packed.sums.device)
        slots.state = {k: sums.take(v.numel()).reshape(v.shape) for k, v in slots.state.items()}
    metrics = {key: sums.take(_numel(shape)).reshape(shape) for key, shape in layout.metrics}
    batches, samples = (round(x) for x in sums.take(2).tolist())
    seen = [h for h in headers if h.batches > 0]
    warnings = list(dict.fromkeys(w for h in seen for w in h.warnings))
    mask = next((h.mask for h in seen if h.mask is not None), None)
    return Part(sites, batches, samples, slots, metrics, warnings, mask, tuple(h.batches for h in headers))


class _Reader:
    """Consecutive slices of a flat tensor."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat, self.at = flat, 0

    def take(self, n: int) -> torch.Tensor:
        out = self.flat[self.at : self.at + n]
        self.at += n
        return out


def merge_parts(parts: Sequence[Part]) -> Part:
    """The Parts of ranks 0, 1, ... merged as the collective merge does it (pure: no processes)."""
    headers = [header_of(p, rank) for rank, p in enumerate(parts)]
    layout = agree(headers)
    packs = [pack(p, layout, torch.device("cpu")) for p in parts]
    merged = Packed(
        torch.stack([p.sums for p in packs]).sum(0),
        torch.stack([p.mins for p in packs]).amin(0),
        merge_moment_rows(torch.stack([p.moments for p in packs])),
    )
    return unpack(merged, layout, headers)


# -- the collective form ---------------------------------------------------------------------------------


def active(group: Any = None) -> bool:
    """A process group with more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_part(part: Part, *, group: Any = None) -> Part:
    """Every rank's Part merged; collective: every rank of ``group`` calls it, and gets the same Part."""
    import torch.distributed as dist

    headers: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(headers, header_of(part, dist.get_rank(group)), group=group)
    layout = agree(headers)
    packed = pack(part, layout, _device(group))
    dist.all_reduce(packed.sums, op=dist.ReduceOp.SUM, group=group)
    if packed.mins.numel():
        dist.all_reduce(packed.mins, op=dist.ReduceOp.MIN, group=group)
    packed.moments = _gather_moments(packed.moments, group)
    return unpack(packed, layout, headers)


def share_failure(exc: BaseException, *, group: Any = None) -> None:
    """Tell the other ranks, waiting in `all_reduce_part`, that this rank's audit failed (they raise
    an error naming it); the caller then raises ``exc`` itself."""
    import torch.distributed as dist

    headers: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(headers, failure_header(exc, dist.get_rank(group)), group=group)


def reduce_recorder(rec: Recorder, *, group: Any = None) -> list[SiteResult]:
    """``rec.results()`` merged over the ranks of ``group`` (the default group) where one with more
    than one rank is initialised; else ``rec.results()``. Collective: every rank calls it at the same
    point (a Monitor: at the same snapshot step), after its forward passes; every rank gets the same
    results. A rank whose Recorder measured nothing yet contributes nothing."""
    part = Part.of_recorder(rec)
    return (all_reduce_part(part, group=group) if active(group) else part).results()


def _device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: this rank's GPU for NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_moments(rows: torch.Tensor, group: Any) -> torch.Tensor:
    """All ranks' (3, channels) moment rows, merged in rank order, a chunk of channels at a time."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    step = max(1, _GATHER_BUDGET // (3 * world))
    merged = []
    for start in range(0, rows.shape[1], step):
        chunk = rows[:, start : start + step].contiguous()
        gathered = [torch.empty_like(chunk) for _ in range(world)]
        dist.all_gather(gathered, chunk, group=group)
        merged.append(merge_moment_rows(torch.stack(gathered)))
    return torch.cat(merged, 1) if merged else rows


__all__ = ["Header", "Layout", "Packed", "active", "agree", "all_reduce_part", "merge_moment_rows", "merge_parts",
           "pack", "reduce_recorder", "share_failure", "unpack"]  # fmt: skip
