"""The Adapter protocol (DESIGN section 4) and lookup by entry point.

An adapter knows one model family: how to build it from a config dict, load it from a deadneuron
checkpoint, feed it data, read its slot masks, score its outputs and train it. deadneuron never imports a
model package by name; adapters come in through the ``deadneuron.adapters`` entry-point group (the bundled
ARC model registers ``arc-slot = "arc_model.adapter:ArcSlotAdapter"``).

The protocol has two parts: `Feed`, what an audit asks (``deadneuron.audit(model, data, adapter=...)``
takes any Feed), and `Adapter`, a Feed that can also build, load, give data and train (what
``deadneuron audit/patch/train`` need for a deadneuron checkpoint). Both are checked at run time by
attribute (`isinstance`), and by mypy in full.

Optional, looked up where present and documented here because the protocol cannot say "may":

- ``position_mask(batch) -> Tensor | None``: bool (N, positions...), True where the batch holds data (the
  ARC adapter: the valid grid cells). An audit then leaves the padding out of every statistic at the sites
  it fits (``mask="auto"``, see `deadneuron.probe.masks`).
- ``mask_dims``: ``{site glob: dims}``, where that mask lies at sites it does not lead (`deadneuron.probe.placement`;
  the ARC adapter: its decoder's (N, K, H, W, C), the mask on dims 0, 2, 3 for every slot), as a user's ``mask_dims``
  would say it; the user's own take precedence.
- ``batches(..., rank=, world_size=)``: under torchrun the command line asks each rank for its own share,
  batch i of the whole stream going to rank ``i % world_size`` (`deadneuron.cli._launch`).
- ``batches(..., max_grids=N)``: at most N samples, the same ones every time (``deadneuron patch
  --audit-grids``); an adapter without the keyword is audited on all of its data.
- ``train(..., progress=, out=, overwrite=, save_optimizer=)``: a progress bar; saving atomically to ``out``
  at every timeline point (``deadneuron train`` then needs not save at the end); leaving out the
  optimizer state.
- ``default_config() -> dict``: the config a checkpoint's stored one is completed with before a patch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from deadneuron.errors import UnreadableInputError

ENTRY_POINT_GROUP = "deadneuron.adapters"

# A deadneuron checkpoint is a plain dict (loadable with weights_only=True) with these keys.
CHECKPOINT_FORMAT = "deadneuron-checkpoint"
CHECKPOINT_VERSION = 1


@runtime_checkable
class Feed(Protocol):
    """What an audit asks of a model family: feed a batch, read the slot masks, score the outputs."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on ``batch`` and return its raw outputs."""
        ...

    def slot_masks(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(masks (N, K, H, W) summing to 1 over K, valid (N, H, W) bool)``, or None for a model without slots."""
        ...

    def metric_sums(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Additive per-batch counts (for example correct and total valid pixels); {} for none."""
        ...

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Task metrics from the summed counts over the whole audit set."""
        ...


@runtime_checkable
class Adapter(Feed, Protocol):
    """What deadneuron needs to know about a model family to audit, patch and retrain its checkpoints."""

    name: str  # the name a deadneuron checkpoint records and the entry point is registered under

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model for ``config``."""
        ...

    def load(self, checkpoint: Mapping[str, Any]) -> nn.Module:
        """The model stored in a (safely loaded) deadneuron checkpoint dict, in eval mode, on CPU."""
        ...

    def batches(self, split: str, config: Mapping[str, Any]) -> Iterable[Any]:
        """Deterministic batches of ``split`` ("train" or "heldout") for the model of ``config``."""
        ...

    def train(
        self,
        config: Mapping[str, Any],
        *,
        init: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        callbacks: Iterable[Callable[..., None]] = (),
    ) -> dict[str, Any]:
        """Train (from ``init``, a checkpoint dict, where given; at most ``max_steps`` steps in all), calling
        every callback with each epoch's record, and return a deadneuron checkpoint dict (format tag,
        version, adapter name, config, state_dict, optimizer state, history, health timeline)."""
        ...


def heldout_batches(adapter: Adapter, config: Mapping[str, Any], *, max_grids: int | None = None) -> Iterable[Any]:
    """The held-out batches of ``config``; at most ``max_grids`` samples where the adapter's ``batches``
    takes that keyword (see the module doc), else all of them."""
    if max_grids is not None and "max_grids" in inspect.signature(adapter.batches).parameters:
        limited: Callable[..., Iterable[Any]] = adapter.batches
        return limited("heldout", config, max_grids=max_grids)
    return adapter.batches("heldout", config)


def available_adapters() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``; a clear error listing the known ones otherwise."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory = ep.load()
            return factory()
    known = ", ".join(available_adapters()) or "none installed"
    raise UnreadableInputError(
        f"checkpoint names adapter {name!r}, which is not installed (known: {known}); "
        "install the package that provides it or pass --model MODULE:FACTORY"
    )


def is_deadneuron_checkpoint(obj: object) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT
