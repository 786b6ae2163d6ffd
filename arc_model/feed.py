"""How the ARC slot model meets deadneuron's audit (`ArcFeed`: feeding a batch, the grid cells that hold
data, the slot masks, the task metrics), and the probe-set figures (slots, metrics) that a training-timeline
entry adds. `arc_model.adapter.ArcSlotAdapter` adds building, loading, data and training to it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from arc_model import data, loss
from arc_model.model import SlotAutoencoder, SlotOutput
from deadneuron.slots import SlotStats


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ArcFeed:
    """What an audit asks of the ARC slot autoencoder (`deadneuron.adapters.Feed`)."""

    name = "arc-slot"  # the audit's mask source: "adapter:arc-slot"
    # The decoder runs every slot at every cell, (N, K, H, W, C): the grid's mask (N, H, W) lies on dims 0, 2, 3
    # there, the same for every slot (`deadneuron.adapters`: an adapter's own mask placements).
    mask_dims: ClassVar[dict[str, tuple[int, ...]]] = {"decoder.layers.*": (0, 2, 3)}

    def forward(self, model: nn.Module, batch: data.GridBatch) -> SlotOutput:
        out: SlotOutput = model(batch.x.to(_device_of(model)))
        return out

    def position_mask(self, batch: data.GridBatch) -> torch.Tensor:
        """(N, H, W) bool, True on the grid's own cells: the audit leaves padding cells out of every
        statistic at the sites it fits (the encoder's conv maps and tokens; the decoder's, on ``mask_dims``)."""
        return batch.valid

    def slot_masks(self, outputs: SlotOutput, batch: data.GridBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.masks, batch.valid.to(outputs.masks.device)

    def metric_sums(self, outputs: SlotOutput, batch: data.GridBatch) -> dict[str, torch.Tensor]:
        device = outputs.logits.device
        return loss.metric_sums(outputs.logits, batch.target.to(device), batch.valid.to(device))

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return loss.summarize(dict(sums))


def probe_figures(model: SlotAutoencoder, batches: Iterable[data.GridBatch]) -> dict[str, Any]:
    """Slot occupancy (``SlotHealth.to_dict()``) and task metrics of ``model`` on ``batches``, in eval
    mode without gradients (the model's mode is restored): what a training-timeline entry adds on its
    probe set beside the health of the training batches."""
    feed, was_training = ArcFeed(), model.training
    slot_stats = SlotStats(model.slot_attention.num_slots)
    totals: dict[str, float] = {}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                out = feed.forward(model, batch)
                slot_stats.update(*feed.slot_masks(out, batch))
                for key, value in feed.metric_sums(out, batch).items():
                    totals[key] = totals.get(key, 0.0) + float(value)
    finally:
        model.train(was_training)
    return {"slots": slot_stats.compute().to_dict(), "metrics": feed.summarize_metrics(totals)}


__all__ = ["ArcFeed", "probe_figures"]
