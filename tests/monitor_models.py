"""Small models and loops for the training-monitor tests. The models store their own pre-activations
and outputs (``stash``) so that tests can count with numpy what the monitor should have measured."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals


class StashCNN(nn.Module):
    """conv 3->16 -> ReLU -> conv 16->64 (-> BatchNorm) -> ReLU -> mean -> linear. Stores z of both
    activations per forward pass, keyed by the loop's step counter ``step``, when ``stash`` is a dict."""

    def __init__(self, *, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64) if bn else nn.Identity()
        self.head = nn.Linear(64, 10)
        self.stash: dict[str, list[tuple[int, np.ndarray]]] | None = None
        self.step = 0

    def _keep(self, key: str, z: torch.Tensor) -> None:
        if self.stash is not None and self.training:
            self.stash.setdefault(key, []).append((self.step, z.detach().clone().numpy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.conv1(x)
        self._keep("conv1>relu", z1)
        z2 = self.bn(self.conv2(F.relu(z1)))
        self._keep("bn>relu", z2)
        return self.head(F.relu(z2).mean((2, 3)))


def teacher_batches(steps: int, *, batch: int = 16, side: int = 10, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images labelled by a fixed random conv teacher (a task the CNN can learn)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Conv2d(3, 10, 3)
    with torch.no_grad():
        nn.init.normal_(teacher.weight, generator=gen)
        out = []
        for _ in range(steps):
            x = torch.randn(batch, 3, side, side, generator=gen)
            out.append((x, teacher(x).mean((2, 3)).argmax(1)))
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
          step: Callable[[], object] | None = None) -> None:  # fmt: skip
    for i, (x, y) in enumerate(batches):
        model.step = i  # type: ignore[assignment]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step is not None:
            step()


def dead_oracle(stash: list[tuple[int, np.ndarray]], first: int, last: int, *, sampled: int = 1) -> set[int]:
    """Channels whose stored ReLU pre-activation was <= 0 on every element of steps first .. last-1."""
    zs = [z for k, z in stash if first <= k < last and k % sampled == 0]
    alive = np.zeros(zs[0].shape[1], dtype=bool)
    for z in zs:
        alive |= (z > 0).any(axis=(0, 2, 3))
    return set(np.flatnonzero(~alive).tolist())


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._forward_hooks_with_kwargs):
            n += len(d)
    return n + len(module_globals._global_forward_hooks) + len(module_globals._global_forward_pre_hooks)
