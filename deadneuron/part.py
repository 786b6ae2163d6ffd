"""What one process measured in an audit, as mergeable state (`Part`): per site its accumulators and
what names and describes it (`SiteInfo`), plus slot statistics, adapter metric sums, batch and sample
counts, warnings and the padding mask used. Pure values: no hooks, no I/O, no communication.

`deadneuron.distributed` merges the Parts of several processes into one; `Part.results` gives the
per-site results a Report is built from (the same as `Recorder.results` for a single process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deadneuron._host import to_host
from deadneuron.probe.placement import MaskPlacement
from deadneuron.probe.site import SiteResult
from deadneuron.stats import ChannelStats, ValueHistogram, summary_of

if TYPE_CHECKING:
    from deadneuron.probe import Recorder
    from deadneuron.slots import SlotStats


@dataclass(frozen=True)
class SiteInfo:
    """What names and describes a site (equal in every process that saw it); no statistics."""

    key: tuple[Any, ...]  # the call place (`Recorder.keyed_sites`)
    name: str
    module: str
    producer: str | None
    functional: bool
    kind: str
    label: str
    channel_axis: int
    axis_source: str
    flat_region: str
    channels: int
    shape: tuple[int, ...]  # of the last call
    mask_placement: MaskPlacement | None = None  # where a choice of the padding mask's dims was made


@dataclass
class SiteState:
    """A site's accumulators and counters."""

    info: SiteInfo
    stats: ChannelStats
    histogram: ValueHistogram | None = None
    calls: int = 0
    masked: bool = False  # a padding mask applied here on some call
    excluded: int = 0  # elements per channel the mask excluded
    unfitted: int = 0  # calls where the batch's mask did not fit this site
    reordered: int = 0  # calls where it fitted, but the positions reordered kept it off (`probe.order`)

    def tensors(self) -> list[torch.Tensor]:
        """The state `result` reads, on its device: the statistics, and the histogram's counts if any."""
        state = [self.stats.state()]
        return [*state, self.histogram.counts] if self.histogram is not None else state

    def result(self, host: Sequence[np.ndarray] | None = None) -> SiteResult:
        """Host values: from ``host`` (`tensors` copied to the host, as `deadneuron._host.to_host` does),
        else copied now (one synchronisation)."""
        if host is None:
            host = to_host(self.tensors())
        i = self.info
        histogram = None
        if self.histogram is not None:
            histogram = tuple(int(c) for c in host[1][: self.histogram.bins])
        return SiteResult(
            name=i.name, module=i.module, producer=i.producer, functional=i.functional, kind=i.kind,
            label=i.label, channel_axis=i.channel_axis, axis_source=i.axis_source, flat_region=i.flat_region,
            example_shape=i.shape, calls=self.calls, summary=summary_of(host[0], i.channels),
            histogram=histogram, masked=self.masked, excluded=self.excluded, unfitted=self.unfitted,
            mask_placement=i.mask_placement, reordered=self.reordered,
        )  # fmt: skip


@dataclass
class Part:
    """One process's share of an audit (or of a Recorder's sites)."""

    sites: list[SiteState] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    slots: SlotStats | None = None
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mask: tuple[str, tuple[int, ...]] | None = None  # the padding mask used: its source and last shape
    rank_batches: tuple[int, ...] = ()  # after a merge: the batches each rank saw, in rank order

    @classmethod
    def of_recorder(cls, rec: Recorder, *, batches: int | None = None, **fields: Any) -> Part:
        """The sites ``rec`` measured (its accumulators, not copies). ``batches`` defaults to 1 where
        it measured a site, else 0; ``fields`` sets the other fields."""
        return cls.of_sites(rec.keyed_sites(), batches=batches, **fields)

    @classmethod
    def of_sites(cls, keyed: Sequence[tuple[tuple[Any, ...], str, Any]], *, batches: int | None = None,
                 **fields: Any) -> Part:  # fmt: skip
        """`of_recorder` from ``Recorder.keyed_sites()`` (or some of them)."""
        sites = [_state(key, name, site) for key, name, site in keyed]
        seen = batches if batches is not None else int(bool(sites))
        return cls(sites=sites, batches=seen, **fields)

    @property
    def histogram_sampled(self) -> bool:
        return any(s.histogram is not None and s.histogram.sampled for s in self.sites)

    def results(self) -> list[SiteResult]:
        """Every site's host values, with one copy to the host per device for all of them."""
        return results_of(self.sites)


def results_of(sites: Sequence[SiteState], extra: Sequence[torch.Tensor] = ()) -> list[SiteResult]:
    """`SiteState.result` of every site from one copy to the host per device."""
    return results_and_host(sites, extra)[0]


def results_and_host(sites: Sequence[SiteState],
                     extra: Sequence[torch.Tensor] = ()) -> tuple[list[SiteResult], list[np.ndarray]]:  # fmt: skip
    """Every site's results, and the ``extra`` tensors as host arrays, all from one copy per device."""
    states, host = states_and_host(sites, extra)
    return [site.result(state) for site, state in zip(sites, states, strict=True)], host


def states_and_host(sites: Sequence[SiteState],
                    extra: Sequence[torch.Tensor] = ()) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:  # fmt: skip
    """Every site's `SiteState.tensors` (what `SiteState.result` reads) and the ``extra`` tensors as host
    arrays, all from one copy per device."""
    tensors = [s.tensors() for s in sites]
    host = to_host([*(t for site in tensors for t in site), *extra])
    states, at = [], 0
    for site in tensors:
        states.append(host[at : at + len(site)])
        at += len(site)
    return states, host[at:]


def _state(key: tuple[Any, ...], name: str, site: Any) -> SiteState:
    info = SiteInfo(
        key=key, name=name, module=site.owner, producer=site.producer, functional=site.functional,
        kind=site.spec.kind_name, label=site.spec.label, channel_axis=site.shown_axis,
        axis_source=site.axis_source.value, flat_region=site.region.describe(), channels=site.stats.channels,
        shape=tuple(site.shape), mask_placement=site.placement.result(),
    )  # fmt: skip
    return SiteState(info, site.stats, site.histogram, site.calls, site.masked, site.excluded, site.unfitted,
                     site.reordered)
