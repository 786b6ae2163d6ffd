"""The checks of `deadneuron.Monitor`'s arguments, made when the Monitor is made: a wrong one is refused
(UsageError naming it) before any training step, not at the first snapshot."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deadneuron._inputs import refuse_meta
from deadneuron.errors import UsageError


def positive_int(value: object, name: str, *, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise UsageError(f"Monitor: {name} must be {what}, got {value!r}")
    return value


def window_args(every: object, sample_every: object, tau: object) -> tuple[int | None, int, float]:
    """``every`` (None: snapshots only when asked), ``sample_every`` (at most ``every``) and ``tau`` in [0, 1)."""
    window = None if every is None else positive_int(every, "every")
    sample = positive_int(sample_every, "sample_every")
    if window is not None and sample > window:
        raise UsageError(f"Monitor: sample_every ({sample_every}) must not exceed every ({every}): "
                         "a window would measure no step")  # fmt: skip
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < 1:
        raise UsageError(f"Monitor: tau must be a number in [0, 1), got {tau!r}")
    return window, sample, float(tau)


def steps_text(first: int, step: int) -> str:
    """The steps a window covers, ``first`` .. ``step - 1``: "steps 10-14", "step 15"; a window closed before
    any step of it was counted (``step == first``) covers the step under way, ``first``."""
    return f"steps {first}-{step - 1}" if step - 1 > first else f"step {first}"


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


def optimizer_lr(optimizer: Any) -> float | None:
    """The learning rate of the optimizer's first parameter group (None without an optimizer or a number)."""
    if optimizer is None or not optimizer.param_groups:
        return None
    lr = optimizer.param_groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None


def optimizer_kind(optimizer: Any) -> str | None:
    """``adam``, ``sgd``...: the optimizer's class, inside a trainer's wrapper (accelerate's, Lightning's) if any."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
    return type(optimizer).__name__.lower() if optimizer is not None else None
