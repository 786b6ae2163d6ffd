"""One window of the training monitor read back at a snapshot (DESIGN section 9), and started afresh.

`read_window` takes the Recorder's statistics of every site the window measured and the observer's
gradient-flow and |a| sums, merges them over the ranks of a process group where one with more than one
rank is initialised (as `deadneuron.audit` merges its statistics: `deadneuron.distributed`; the flow
sums add up), and copies everything to the host at once: one device-to-host transfer per snapshot.
Every rank gets the same figures. They stay host arrays: the per-site `SiteResult` (what a Report is
built from) is made only when asked for (`WindowFigures.results`). `reset_window` starts the next window on the same hooks; `forward_mask`
finds the padding mask of a training forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deadneuron.gradflow import FlowHost, FlowObserver, flow_hosts, flow_rows
from deadneuron.part import Part, SiteState, states_and_host
from deadneuron.probe import Recorder
from deadneuron.probe.functional import tensors
from deadneuron.probe.masks import MaskChoice, MaskSpec, choose_mask
from deadneuron.probe.seq2seq import is_encoder_decoder
from deadneuron.probe.site import SiteResult


@dataclass(frozen=True)
class WindowFigures:
    """What a window measured, on the host, per site (same order): what names it and its counters
    (``sites``; their statistics are live and are not read here), the host copies of its state
    (``states``: `SiteState.tensors`, first `deadneuron.stats.ChannelStats.state`), and its flow sums."""

    sites: list[SiteState]
    states: list[list[np.ndarray]]
    flows: list[FlowHost]
    warnings: list[str]
    world_size: int = 1

    def results(self) -> list[SiteResult]:
        """Every site's `SiteResult`, from the host copies (no synchronisation)."""
        return [site.result(state) for site, state in zip(self.sites, self.states, strict=True)]


def read_window(rec: Recorder, observer: FlowObserver, *, distributed: bool = True, group: Any = None) -> WindowFigures:
    """The window's figures (empty where it measured no site). With ``distributed`` and an initialised
    process group of more than one rank: collective (every rank calls it at the same step) and merged
    over the ranks; a rank that measured nothing contributes nothing."""
    from deadneuron.distributed import active, all_reduce_part

    keyed = [(key, name, site) for key, name, site in rec.keyed_sites() if site.calls]
    flows = {key: observer.flow_of(site) for key, _, site in keyed}
    part = Part.of_sites(keyed, warnings=rec.warnings())
    merge = distributed and active(group)
    if merge:
        part = all_reduce_part(part, group=group)  # on the group's device: the flow rows go there too
    channels, kinds = [s.info.channels for s in part.sites], [s.info.kind for s in part.sites]
    device = part.sites[0].stats.acc.device if part.sites else torch.device("cpu")
    row = flow_rows([flows.get(s.info.key) for s in part.sites], channels, device)
    world = _sum_over_ranks(row, group) if merge else 1
    states, (host,) = states_and_host(part.sites, [row])
    return WindowFigures(part.sites, states, flow_hosts(host, channels, kinds), list(part.warnings), world)


def _sum_over_ranks(row: torch.Tensor, group: Any) -> int:
    """Add ``row`` over the ranks in place (every rank has the same layout); the world size."""
    import torch.distributed as dist

    if row.numel():
        dist.all_reduce(row, op=dist.ReduceOp.SUM, group=group)
    return dist.get_world_size(group)


def forward_mask(spec: MaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any], *, model: nn.Module | None = None) -> MaskChoice:
    """The padding mask of one training forward pass, from its arguments: ``spec`` as for
    `deadneuron.audit`, where the batch is the forward's keyword arguments (a dict: ``"auto"`` finds an
    ``attention_mask`` beside ``input_ids``; a str names a keyword) or else its first argument; a
    callable gets the forward's arguments themselves (``mask(*args, **kwargs)``). ``model``: the module called
    (an encoder-decoder's batches get the warning of `deadneuron.probe.seq2seq`)."""
    batch = kwargs if kwargs else (args[0] if len(args) == 1 else args)
    first = next(tensors(batch), None)
    if first is None:
        return MaskChoice(None, None)
    if callable(spec):
        call = spec
        spec = lambda _: call(*args, **kwargs)  # noqa: E731
    return choose_mask(spec, batch, batch_size=first.shape[0] if first.dim() else 0, device=first.device,
                       seq2seq=model is not None and is_encoder_decoder(model))


def reset_window(rec: Recorder, observer: FlowObserver) -> None:
    """Start every site's statistics and sums afresh, keeping the sites, their names and the hooks. A site
    not called again keeps ``calls == 0`` (and is left out of the next snapshot)."""
    for _, site in rec.named_sites():
        site.stats.reset()
        if site.histogram is not None:
            site.histogram.reset()
        site.calls = site.excluded = site.unfitted = site.reordered = site.vmapped = 0
        site.masked = False
    observer.reset()


__all__ = ["WindowFigures", "forward_mask", "read_window", "reset_window"]
