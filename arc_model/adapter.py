"""deadneuron's Adapter for the bundled ARC slot model (entry point ``deadneuron.adapters: arc-slot``): the
audit's part (`arc_model.feed.ArcFeed`) plus building, loading, data and training."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from arc_model import data
from arc_model.config import TrainConfig
from arc_model.feed import ArcFeed
from arc_model.model import build_model
from deadneuron.errors import ModelMismatchError, UsageError

if TYPE_CHECKING:
    from deadneuron.adapters import Adapter


def _config(config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
    """A TrainConfig; a bad key or value is a UsageError (exit code 2) naming the valid keys."""
    if isinstance(config, TrainConfig):
        return config
    try:
        return TrainConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise UsageError(f"arc-slot config: {err}") from None


class ArcSlotAdapter(ArcFeed):
    """Builds, loads, feeds and scores the ARC slot autoencoder for deadneuron (`deadneuron.adapters.Adapter`)."""

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


if TYPE_CHECKING:  # the ARC adapter follows deadneuron's protocol in full: mypy checks it here
    _FOLLOWS_THE_PROTOCOL: Adapter = ArcSlotAdapter()

__all__ = ["ArcSlotAdapter"]
