"""Helpers for torch's function-mode stack (the functional probe is a `TorchFunctionMode`)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack wherever it is (modes above it stay)."""
    above = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def on_stack(mode: TorchFunctionMode) -> bool:
    return any(torch._C._get_function_stack_at(i) is mode for i in range(torch._C._len_torch_function_stack()))


def is_top(mode: TorchFunctionMode) -> bool:
    """Whether ``mode`` is on top of the stack (the next torch call reaches it first)."""
    depth = torch._C._len_torch_function_stack()
    return bool(depth) and torch._C._get_function_stack_at(depth - 1) is mode


def pop_if_top(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off the stack if it is on top; whether it was."""
    depth = torch._C._len_torch_function_stack()
    if depth and torch._C._get_function_stack_at(depth - 1) is mode:
        torch._C._pop_torch_function_stack()
        return True
    return False
