"""deadneuron's Adapter for the bundled ARC slot model (entry point ``deadneuron.adapters: arc-slot``),
and the health snapshot that the training loop stores in its timeline."""

from __future__ import annotations

import copy
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


def health_snapshot(model: SlotAutoencoder, batches: Iterable[data.GridBatch]) -> dict[str, Any]:
    """Per-site sparsity, flat fraction and dead channels, slot occupancy and metrics on ``batches``.

    Uses ``deadneuron.audit`` where it is importable; until then a minimal probe of the encoder's shared
    activation (the four ``encoder.bn_layers.i>relu`` sites), with the same definitions.
    """
    try:
        from deadneuron.audit import audit
    except ImportError:
        return _fallback_snapshot(model, list(batches))
    report = audit(model, list(batches), adapter=ArcSlotAdapter())
    sites = {name: _site_entry(site) for name, site in report.sites.items()}
    slots = report.slots.to_dict() if report.slots is not None else None
    return {"source": "deadneuron.audit", "sites": sites, "slots": slots, "metrics": dict(report.metrics)}


def _site_entry(site: Any) -> dict[str, Any]:
    dead = site.dead_channels
    dead_list = [int(c) for c in dead] if not isinstance(dead, int) else None
    return {
        "sparsity": float(site.sparsity),
        "flat_fraction": float(site.flat_fraction),
        "dead": len(dead_list) if dead_list is not None else int(dead),
        "dead_channels": dead_list,
    }


def flat_threshold(activation: nn.Module, delta: float = 0.05) -> float:
    """Largest z such that |f'| <= delta * max|f'| on all of (-30, z]: the left flat tail of f."""
    z = (torch.arange(-30_000, 30_001, dtype=torch.float64) / 1000).requires_grad_()  # 0 on the grid
    with torch.enable_grad():
        (slope,) = torch.autograd.grad(copy.deepcopy(activation).double()(z).sum(), z)
    small = slope.abs() <= delta * slope.abs().max()
    if not bool(small[0]):
        return float("-inf")
    first_big = int((~small).nonzero()[0]) if bool((~small).any()) else len(z)
    return float(z.detach()[first_big - 1])


def _fallback_snapshot(model: SlotAutoencoder, batches: list[data.GridBatch]) -> dict[str, Any]:
    encoder = model.encoder
    lo = flat_threshold(encoder.relu)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    calls = [0]
    valid: list[torch.Tensor] = []  # the current batch's grid cells: padding is left out, as in the audit

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        site = calls[0] % len(encoder.conv_layers)
        calls[0] += 1
        z = args[0].detach().transpose(0, 1)[:, valid[-1]]  # (C, valid cells)
        a = out.detach().transpose(0, 1)[:, valid[-1]]
        part = {"n": torch.full((z.shape[0],), z.shape[1]), "zero": a.eq(0).sum(1), "flat": z.le(lo).sum(1)}
        previous = sums.setdefault(site, {k: torch.zeros_like(v) for k, v in part.items()})
        for key, value in part.items():
            previous[key] += value

    adapter, was_training = ArcSlotAdapter(), model.training
    slot_stats = SlotStats(model.slot_attention.num_slots)
    metric_totals: dict[str, float] = {}
    handle = encoder.relu.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                valid[:] = [batch.valid.to(_device_of(model))]
                out = adapter.forward(model, batch)
                slot_stats.update(*adapter.slot_masks(out, batch))
                for key, value in adapter.metric_sums(out, batch).items():
                    metric_totals[key] = metric_totals.get(key, 0.0) + float(value)
    finally:
        handle.remove()
        model.train(was_training)
    return {
        "source": "arc_model.fallback",
        "sites": {f"encoder.bn_layers.{i}>relu": _fallback_site(s) for i, s in sorted(sums.items())},
        "slots": slot_stats.compute().to_dict(),
        "metrics": adapter.summarize_metrics(metric_totals),
    }


def _fallback_site(s: dict[str, torch.Tensor]) -> dict[str, Any]:
    n = float(s["n"].sum())
    dead = (s["flat"] == s["n"]).nonzero().flatten().tolist()
    return {
        "sparsity": float(s["zero"].sum()) / n,
        "flat_fraction": float(s["flat"].sum()) / n,
        "dead": len(dead),
        "dead_channels": dead,
    }
