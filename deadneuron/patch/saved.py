"""A patched generic model on disk: its state_dict with the plan recorded beside it, and back.

The file is a ``torch.save``d dict of plain types (``weights_only`` loads it)::

    {"format": "deadneuron-patched-state", "version": 1, "state_dict": {...},
     "plan": <the resolved plan>, "requested_plan": <the plan as asked>, "record": <what changed>,
     "source": "...", "source_sha256": "...", "model": "MODULE:FACTORY", "model_args": {...}}

The *resolved* plan names exactly the modules and functional calls that were changed
(``module:encoder.relu``, ``function:<root>.relu``), so :func:`load_patched` rebuilds the same
architecture from the factory and then loads the weights strictly. The factory is always passed in:
a file never decides which code is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from deadneuron.errors import ModelMismatchError, UnreadableInputError
from deadneuron.patch.plan import Plan, ReinitDead

PATCHED_FORMAT = "deadneuron-patched-state"
PATCHED_VERSION = 1


def patched_state(
    model: nn.Module,
    *,
    resolved: Plan,
    requested: Plan,
    record: Mapping[str, Any],
    source: str,
    source_sha256: str | None = None,
    model_spec: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict to save for a patched generic model."""
    return {
        "format": PATCHED_FORMAT,
        "version": PATCHED_VERSION,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "plan": resolved.to_dict(),
        "requested_plan": requested.to_dict(),
        "record": dict(record),
        "source": source,
        "source_sha256": source_sha256,
        "model": model_spec,
        "model_args": dict(model_args or {}),
    }


def is_patched_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == PATCHED_FORMAT


def load_patched(
    source: str | os.PathLike[str] | Mapping[str, Any],
    factory: Callable[..., nn.Module],
    *,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The patched model: ``factory(**model_args)`` (default: the arguments recorded in the file), the
    recorded plan applied to it, then the saved weights loaded strictly."""
    from deadneuron.checkpoint import load_checkpoint, load_state_dict_strict
    from deadneuron.patch.apply import apply_plan

    where = str(source) if not isinstance(source, Mapping) else "patched state"
    obj = source if isinstance(source, Mapping) else load_checkpoint(source)
    if not is_patched_state(obj):
        raise UnreadableInputError(f"{where}: not a file written by `deadneuron patch --model ...` (no {PATCHED_FORMAT} tag)")
    assert isinstance(obj, Mapping)
    if obj.get("version") != PATCHED_VERSION:
        raise UnreadableInputError(f"{where}: patched-state version {obj.get('version')} is not supported")
    args = dict(model_args if model_args is not None else obj.get("model_args") or {})
    model = factory(**args)
    if not isinstance(model, nn.Module):
        raise ModelMismatchError(f"{where}: the factory returned {type(model).__name__}, not an nn.Module")
    plan = Plan.from_dict(obj["plan"])
    plan = Plan(tuple(op for op in plan.ops if not isinstance(op, ReinitDead)))
    patched = apply_plan(model, plan).model
    load_state_dict_strict(patched, obj["state_dict"], source=where)
    return patched


__all__ = ["PATCHED_FORMAT", "PATCHED_VERSION", "is_patched_state", "load_patched", "patched_state"]
