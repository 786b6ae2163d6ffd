"""How the ARC slot model meets deadneuron's audit (`ArcFeed`: feeding a batch, the grid cells that hold
data, the slot masks, the task metrics), and the health snapshot the training loop stores in its timeline.
`arc_model.adapter.ArcSlotAdapter` adds building, loading, data and training to it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from arc_model import data, loss
from arc_model.model import SlotAutoencoder, SlotOutput
from deadneuron.audit import audit
from deadneuron.report import SiteHealth


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ArcFeed:
    """What an audit asks of the ARC slot autoencoder (`deadneuron.adapters.Feed`)."""

    name = "arc-slot"  # the audit's mask source: "adapter:arc-slot"

    def forward(self, model: nn.Module, batch: data.GridBatch) -> SlotOutput:
        out: SlotOutput = model(batch.x.to(_device_of(model)))
        return out

    def position_mask(self, batch: data.GridBatch) -> torch.Tensor:
        """(N, H, W) bool, True on the grid's own cells: the audit leaves padding cells out of every
        statistic at the sites of that shape (the encoder's conv maps)."""
        return batch.valid

    def slot_masks(self, outputs: SlotOutput, batch: data.GridBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.masks, batch.valid.to(outputs.masks.device)

    def metric_sums(self, outputs: SlotOutput, batch: data.GridBatch) -> dict[str, torch.Tensor]:
        device = outputs.logits.device
        return loss.metric_sums(outputs.logits, batch.target.to(device), batch.valid.to(device))

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return loss.summarize(dict(sums))


def health_snapshot(model: SlotAutoencoder, batches: Iterable[data.GridBatch]) -> dict[str, Any]:
    """Per-site sparsity, flat fraction and dead channels, slot occupancy and metrics on ``batches``: a
    `deadneuron.audit` without findings."""
    report = audit(model, list(batches), adapter=ArcFeed(), rules=False)
    sites = {name: _site_entry(site) for name, site in report.sites.items()}
    slots = report.slots.to_dict() if report.slots is not None else None
    return {"source": "deadneuron.audit", "sites": sites, "slots": slots, "metrics": dict(report.metrics)}


def _site_entry(site: SiteHealth) -> dict[str, Any]:
    return {
        "sparsity": float(site.sparsity),
        "flat_fraction": float(site.flat_fraction),
        "dead": len(site.dead_channels),
        "dead_channels": [int(c) for c in site.dead_channels],
    }


__all__ = ["ArcFeed", "health_snapshot"]
