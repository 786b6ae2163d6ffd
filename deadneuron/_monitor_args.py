"""The checks of `deadneuron.Monitor`'s arguments, made when the Monitor is made: a wrong one is refused
(UsageError naming it) before any training step, not at the first snapshot."""

from __future__ import annotations

from typing import Any

from torch import nn

from deadneuron._inputs import refuse_meta
from deadneuron.errors import UsageError


def positive_int(value: object, name: str, *, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise UsageError(f"Monitor: {name} must be {what}, got {value!r}")
    return value


def module_arg(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UsageError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_meta(model)
    return model


def optimizer_arg(optimizer: Any) -> Any:
    """The optimizer, or None; anything without parameter groups (a class, a scheduler) is refused now rather
    than at the first snapshot, when its learning rate is read."""
    if optimizer is not None and (isinstance(optimizer, type) or not hasattr(optimizer, "param_groups")):
        what = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
        raise UsageError(f"Monitor: optimizer must be a torch.optim.Optimizer instance (its param_groups give the "
                         f"learning rate), got {what}; pass the optimizer your loop steps")  # fmt: skip
    return optimizer
