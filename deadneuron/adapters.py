"""The Adapter protocol (DESIGN section 4) and lookup by entry point.

An adapter knows one model family: how to build it from a config dict, load it from a deadneuron
checkpoint, feed it data, read its slot masks and score its outputs. deadneuron never imports a model
package by name; adapters come in through the ``deadneuron.adapters`` entry-point group.

An adapter may also define ``position_mask(batch) -> Tensor | None``: bool of shape (N, positions...),
True where the batch holds data (the ARC adapter: the valid grid cells). `deadneuron.audit` then leaves
the padding out of every statistic at the sites it fits (``mask="auto"``, see `deadneuron.probe.masks`).
It is optional, so it is not part of the runtime-checked protocol below. So is accepting ``rank`` and
``world_size`` keyword arguments in ``batches()``: under torchrun the command line then asks each rank
for its own share, batch i of the whole stream going to rank ``i % world_size`` (`deadneuron.cli._launch`).
"""

from __future__ import annotations

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
class Adapter(Protocol):
    """What deadneuron needs to know about a model family to audit, patch and retrain it."""

    name: str

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model for ``config``."""
        ...

    def load(self, checkpoint: Mapping[str, Any]) -> nn.Module:
        """The model stored in a (safely loaded) deadneuron checkpoint dict, in eval mode, on CPU."""
        ...

    def batches(self, split: str, config: Mapping[str, Any]) -> Iterable[Any]:
        """Deterministic batches of ``split`` ("train" or "heldout")."""
        ...

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on ``batch`` and return its raw outputs."""
        ...

    def slot_masks(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(masks (N, K, H, W) summing to 1 over K, valid (N, H, W) bool)`` or None."""
        ...

    def metric_sums(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Additive per-batch counts (for example correct and total valid pixels)."""
        ...

    def summarize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Task metrics from the summed counts over the whole audit set."""
        ...

    def train(
        self,
        config: Mapping[str, Any],
        *,
        init: Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        callbacks: Iterable[Callable[..., None]] = (),
    ) -> dict[str, Any]:
        """Train and return a deadneuron checkpoint dict (format tag, config, state_dict, history...)."""
        ...


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
