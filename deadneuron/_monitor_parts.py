"""The monitor's gates on the parts of a model: a part called on its own in eval mode is no training.

A loop that validates through a part of the model (``model.eval(); model.encoder(x)``) never calls the model
itself, so the model's own forward hook, which pauses the monitor for an eval-mode pass, does not run. These
gates sit on every module of the model that has children (the parts a loop may call on its own) while the
monitor measures: a part in eval mode called outside the model's own forward pass pauses the measurement
until that call returns. Inside the model's forward pass they do nothing (a frozen part kept in eval mode
is part of a training pass there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class PartGates:
    """Hooks on the parts of ``model`` (on while `on`), calling ``pause`` when a part in eval mode is called
    outside the model's own forward pass (``in_model`` False) and ``resume`` when that call returns."""

    def __init__(self, model: nn.Module, *, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._parts = [m for m in model.modules() if m is not model and next(iter(m.children()), None) is not None]
        self._pause, self._resume = pause, resume
        self._handles: list[RemovableHandle] = []
        self.in_model = False  # the model's own forward pass is running
        self.paused: nn.Module | None = None  # the part whose eval-mode call paused the measurement

    def on(self) -> None:
        if not self._handles:
            for part in self._parts:
                self._handles += [part.register_forward_pre_hook(self._enter), part.register_forward_hook(self._exit)]

    def off(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, part: nn.Module, args: tuple[Any, ...]) -> None:
        if self.paused is None and not self.in_model and not part.training:
            self.paused = part
            self._pause()

    def _exit(self, part: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.paused is part:
            self.paused = None
            self._resume()


__all__ = ["PartGates"]
