"""The layers `deadneuron.patch.reinit` gives fresh incoming weights and zero outgoing ones: convolutions and
linear layers (one weight row per output, one column per input), and Hugging Face's ``Conv1D`` (GPT-2's: a
linear layer with its weight stored transposed, (inputs, outputs), initialised in its constructor).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _inputs(m: nn.Module) -> int:
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def is_transposed(m: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D``: weight (nx, nf), bias (nf,), built as ``Conv1D(nf, nx)``."""
    cls = type(m)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and isinstance(getattr(m, "nf", None), int)


def writes(m: nn.Module, channels: int) -> bool:
    """``m`` is a conv/linear layer with ``channels`` outputs."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels == channels and m.groups == 1
    if is_transposed(m):
        return bool(m.nf == channels)
    return isinstance(m, nn.Linear) and m.out_features == channels


def reads(m: nn.Module, channels: int) -> bool:
    """``m`` is a conv/linear layer with ``channels`` inputs."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels == channels and m.groups == 1
    if is_transposed(m):
        return _inputs(m) == channels
    return isinstance(m, nn.Linear) and m.in_features == channels


def fresh_rows(layer: nn.Module, ids: list[int], note: Callable[[torch.Tensor, int], None]) -> None:
    """Fresh incoming weights (and bias) for outputs ``ids`` of ``layer``, drawn by its own initialiser; ``note``
    (parameter, dim) is told each slice changed."""
    if is_transposed(layer):
        fresh: Any = type(layer)(layer.nf, _inputs(layer))
        dims = {"weight": 1, "bias": 0}
    else:
        fresh = copy.deepcopy(layer)
        fresh.reset_parameters()
        dims = {"weight": 0, "bias": 0}
    for name, dim in dims.items():
        p, q = getattr(layer, name, None), getattr(fresh, name, None)
        if isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor):
            index = torch.tensor(ids, device=p.device)
            p.index_copy_(dim, index, q.to(p.device, p.dtype).index_select(dim, index.to(q.device)))
            note(p, dim)


def zero_inputs(layer: nn.Module, ids: list[int], note: Callable[[torch.Tensor, int], None]) -> None:
    """Zero weights from inputs ``ids`` of ``layer`` (its outgoing weights from those channels)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    dim = 0 if is_transposed(layer) else 1
    weight.index_fill_(dim, torch.tensor(ids, device=weight.device), 0.0)
    note(weight, dim)
