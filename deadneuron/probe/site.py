"""A call site's running state (`Site`), its host-side result (`SiteResult`), and final site names.

Naming (stable across batches):

* an activation module with a single call site keeps its qualified name (``mlp.act``);
* a reused module is named after the module whose output it consumed: ``encoder.bn_layers.2>relu``
  (after the ``>`` its attribute name, or its kind where that name is a Sequential index);
* a functional activation is named the same way after its producer: ``conv1>relu``; if its input was
  not a module output, after the module inside whose forward it ran: ``block.relu``;
* names still shared by several sites get ``#k`` in call order within the forward pass (0-based).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from deadneuron.activations import ActivationSpec, FlatRegion
from deadneuron.probe.axisrules import AxisSource
from deadneuron.probe.placement import MaskPlacement, SitePlacement
from deadneuron.stats import ChannelStats, ChannelSummary, ValueHistogram

if TYPE_CHECKING:
    from deadneuron.probe.masks import BatchMask


@dataclass
class Site:
    owner: str  # activation module's qualified name, or the enclosing module for a functional call
    leaf: str  # "relu" (module attribute name) or the function name
    functional: bool
    producer: str | None
    occurrence: int
    spec: ActivationSpec
    region: FlatRegion
    axis: int  # the channel axis, negative where counted from the end (the form that holds at any rank: `layout`)
    axis_source: AxisSource
    stats: ChannelStats
    shape: tuple[int, ...] = ()
    calls: int = 0
    rank: int = 0  # the rank of the input of the last call (a call of another rank is checked: `layout.refit`)
    names: tuple[str, ...] = field(default=(), repr=False, compare=False)  # what per-site settings match
    histogram: ValueHistogram | None = None
    masked: bool = False  # the batch's padding mask applied here (on some call)
    excluded: int = 0  # elements per channel the mask excluded, over all calls
    unfitted: int = 0  # calls where the batch had a mask that did not fit this site
    placement: SitePlacement = field(default_factory=SitePlacement, repr=False, compare=False)  # of the mask
    taken: bool = field(default=False, repr=False, compare=False)  # this call measured whole before it ran
    reordered: int = 0  # calls whose positions were reordered (`deadneuron.probe.order`) as no mask could follow
    vmapped: int = 0  # calls inside torch.func.vmap (`deadneuron.probe.batched`): every mapped example pooled
    experts: str | None = None  # the stacked expert weights it is computed with (`deadneuron.probe.experts`)
    reordering: bool = field(default=False, repr=False, compare=False)  # this call's positions were reordered,
    call_mask: BatchMask | None = field(default=None, repr=False, compare=False)  # so it is measured under this

    def flat_from_z_first(self, inplace: bool) -> bool:
        """The flat region must be tested on z before the call: the call overwrites z (the output
        cannot tell an infinite z from a finite one, so it is not read there), or the region is per
        channel (PReLU) and needs its own kernel."""
        return inplace or isinstance(self.region.lo, torch.Tensor)

    @property
    def single(self) -> bool:
        """Whether the input has no channel dim (`AxisSource.NONE`): one channel over every element."""
        return self.axis_source is AxisSource.NONE

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as this site reads it: with a unit dim after its last where it has no channel dim (so that
        the channel axis, -1, holds the one channel and a padding mask still fits its leading dims)."""
        return t.unsqueeze(-1) if self.axis_source is AxisSource.NONE else t

    @property
    def shown_axis(self) -> int:
        """The channel axis as a dim of the last call's input (``shape``): what reports show."""
        return self.axis % len(self.shape) if self.shape and self.axis < 0 else max(self.axis, 0)

    @property
    def base_name(self) -> str:
        if self.producer is not None:
            return f"{self.producer}>{self.leaf}"
        if self.functional:
            return f"{self.owner}.{self.leaf}" if self.owner else self.leaf
        return self.owner

    def result(self, name: str) -> SiteResult:
        """What was measured here, as host values (one synchronisation: `ChannelStats.compute`)."""
        return SiteResult(
            name=name, module=self.owner, producer=self.producer, functional=self.functional,
            kind=self.spec.kind_name, label=self.spec.label, channel_axis=self.shown_axis,
            axis_source=self.axis_source.value, flat_region=self.region.describe(), example_shape=self.shape,
            calls=self.calls, summary=self.stats.compute(),
            histogram=tuple(self.histogram.compute()) if self.histogram is not None else None,
            masked=self.masked, excluded=self.excluded, unfitted=self.unfitted,
            mask_placement=self.placement.result(), reordered=self.reordered,
        )  # fmt: skip


@dataclass(frozen=True)
class SiteResult:
    """What the Recorder measured at one site (host values)."""

    name: str
    module: str
    producer: str | None
    functional: bool
    kind: str
    label: str
    channel_axis: int
    axis_source: str
    flat_region: str
    example_shape: tuple[int, ...]
    calls: int
    summary: ChannelSummary
    histogram: tuple[int, ...] | None = None
    masked: bool = False  # a padding mask applied at this site
    excluded: int = 0  # elements per channel the mask excluded, over all calls
    unfitted: int = 0  # calls where the batch had a mask that did not fit the site's shape
    mask_placement: MaskPlacement | None = None  # where a choice of the mask's dims was made (`placement`)
    reordered: int = 0  # calls where the mask fitted, but the positions reordered kept it off (`order`)


def site_names(sites: Sequence[Site]) -> list[str]:
    """Final names of ``sites`` (in order of first call): an activation module with one call site keeps
    its qualified name; otherwise producer-based names, with ``#k`` where still shared."""
    per_owner: dict[tuple[str, bool, str], int] = {}
    for s in sites:
        owner = (s.owner, s.functional, s.leaf)
        per_owner[owner] = per_owner.get(owner, 0) + 1
    bases = []
    for s in sites:
        single_module = not s.functional and per_owner[(s.owner, False, s.leaf)] == 1
        bases.append(s.owner if single_module else s.base_name)
    seen: dict[str, int] = {}
    totals = {b: bases.count(b) for b in bases}
    names = []
    for b in bases:
        k = seen.get(b, 0)
        seen[b] = k + 1
        names.append(b if totals[b] == 1 else f"{b}#{k}")
    return names


def shown_name(sites: Iterable[Site], site: Site) -> str:
    """``site``'s name as the tables will show it, while the forward pass runs (without ``#k``), among the
    ``sites`` found so far."""
    shared = sum(s.owner == site.owner and not s.functional for s in sites) > 1
    return site.base_name if site.functional or shared else site.owner


def site_globs(sites: Iterable[Site], owner: str, leaf: str, producer: str | None, functional: bool) -> tuple[str, ...]:
    """Names a user's per-site setting (a glob) may match for a new site among ``sites``: the module, the
    producer-based name, and the site's base name with the ``#k`` that final names add where several sites
    share it."""
    names = [owner] if owner and not functional else []
    names.append(f"{producer}>{leaf}" if producer else (f"{owner}.{leaf}" if functional and owner else leaf))
    base = names[-1] if producer or functional else owner
    names.append(f"{base}#{sum(s.base_name == base for s in sites)}")
    return tuple(names)
