"""The mark an added BatchNorm leaves on its layer (``deadneuron patch --add-batchnorm``): a ``batchnorm``
child applied by a `BatchNormHook` forward hook. The rules read it (`has_added_batchnorm`) to know that a
layer is normalised; `deadneuron.patch.batchnorm` adds it, `deadneuron.patch.saved` re-makes it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHILD = "batchnorm"  # the attribute the added BatchNorm takes on its layer


class BatchNormHook:
    """A forward hook passing a layer's output through its ``batchnorm`` child: channels at dim 1 for a
    conv layer, last for a linear one (any leading dims are treated as batch positions)."""

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: Any, out: Any) -> Any:
        norm = module._modules.get(CHILD)
        if norm is None or not isinstance(out, torch.Tensor):
            return out
        if not self.channels_last or out.dim() == 2:
            return norm(out)
        return norm(out.reshape(-1, out.shape[-1])).reshape(out.shape)


def has_added_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):  # takes no Python hooks
        return False
    return isinstance(module._modules.get(CHILD), nn.modules.batchnorm._BatchNorm) and any(
        isinstance(h, BatchNormHook) for h in module._forward_hooks.values()
    )


__all__ = ["CHILD", "BatchNormHook", "has_added_batchnorm"]
