"""deadneuron's Adapter for the bundled ARC slot model (entry point ``deadneuron.adapters: arc-slot``),
and the probe-set figures (slots, metrics) that the training loop adds to its health timeline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from arc_model import data, loss
from arc_model.config import TrainConfig
from arc_model.model import SlotAutoencoder, SlotOutput, build_model
from deadneuron.errors import ModelMismatchError, UsageError
from deadneuron.slots import SlotStats


def _config(config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
    """A TrainConfig; a bad key or value is a UsageError (exit code 2) naming the valid keys."""
    if isinstance(config, TrainConfig):
        return config
    try:
        return TrainConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise UsageError(f"arc-slot config: {err}") from None


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ArcSlotAdapter:
    """Builds, loads, feeds and scores the ARC slot autoencoder for deadneuron."""

    name = "arc-slot"

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        return build_model(_config(config))

    def load(self, checkpoint: Mapping[str, Any]) -> nn.Module:
        model = build_model(_config(checkpoint.get("config", {})))
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except (KeyError, RuntimeError) as err:
            raise ModelMismatchError(f"checkpoint does not fit the arc-slot model of its config: {err}") from None
        return model.eval()

    def batches(self, split: str, config: Mapping[str, Any], *, max_grids: int | None = None) -> Iterator[data.GridBatch]:
        """All held-out grids ("heldout") or the config's training subset ("train"), in a fixed order."""
        cfg = _config(config)
        if split == "heldout":
            grids = data.load_grids("heldout")
        elif split == "train":
            grids = data.training_grids(cfg.NUM_GRIDS, cfg.SEED)
        else:
            raise UsageError(f"unknown split {split!r}; the arc-slot adapter has 'train' and 'heldout'")
        if max_grids is not None:
            grids = data.select_grids(grids, max_grids, data.PROBE_SEED)
        return data.eval_batches(grids, cfg.BATCH_SIZE)

    def forward(self, model: nn.Module, batch: data.GridBatch) -> SlotOutput:
        return model(batch.x.to(_device_of(model)))

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

    def default_config(self) -> dict[str, Any]:
        return TrainConfig().to_dict()

    def parse_config(self, items: Sequence[str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``base`` (default: the defaults) with ``["KEY=VALUE", ...]`` applied, each parsed to its type."""
        try:
            return _config(base or {}).with_overrides(items).to_dict()
        except ValueError as err:
            raise UsageError(f"--config: {err}") from None

    def train(
        self,
        config: Mapping[str, Any],
        *,
        init: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        callbacks: Iterable[Callable[..., None]] = (),
        progress: bool = False,
        out: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        save_optimizer: bool = True,
    ) -> dict[str, Any]:
        """``arc_model.train.train``: a checkpoint dict, also written atomically to ``out`` if given."""
        from arc_model.train import train

        return train(_config(config), init=init, max_steps=max_steps, callbacks=callbacks, progress=progress,
                     out=out, overwrite=overwrite, save_optimizer=save_optimizer)


def probe_figures(model: SlotAutoencoder, batches: Iterable[data.GridBatch]) -> dict[str, Any]:
    """Slot occupancy (``SlotHealth.to_dict()``) and task metrics of ``model`` on ``batches``, in eval
    mode without gradients (the model's mode is restored): what a training-timeline entry adds on its
    probe set beside the health of the training batches."""
    adapter, was_training = ArcSlotAdapter(), model.training
    slot_stats = SlotStats(model.slot_attention.num_slots)
    totals: dict[str, float] = {}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                out = adapter.forward(model, batch)
                slot_stats.update(*adapter.slot_masks(out, batch))
                for key, value in adapter.metric_sums(out, batch).items():
                    totals[key] = totals.get(key, 0.0) + float(value)
    finally:
        model.train(was_training)
    return {"slots": slot_stats.compute().to_dict(), "metrics": adapter.summarize_metrics(totals)}
