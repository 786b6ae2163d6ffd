"""A user's own small CNN with planted dead channels, and its data, training and metric functions, for
`deadneuron patch --model tests/own_cnn.py:build --data tests/own_cnn.py:batches --train tests/own_cnn.py:train`.

Channels 0-3 of ``conv`` start with bias -0.5 while its pre-activations have a standard deviation of
about 0.06 on this data: their ReLU is negative on every element, so they are dead, and a ReLU passes
them no gradient, so training cannot revive them. Behind a LeakyReLU the leak carries a gradient, the
head's positive weights make it push their bias up (the target is above every output), and Adam's
per-parameter step size makes that small gradient move the bias at the full learning rate: they revive
within a few dozen steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

DEAD = (0, 1, 2, 3)
WIDTH = 8
SCALE = 0.1  # input scale: pre-activations of about 0.06 standard deviation
TARGET = 50.0  # far above every output: the loss pushes every channel up for the whole budget


def build() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, 1)
    )  # fmt: skip
    with torch.no_grad():
        model[0].bias[list(DEAD)] = -0.5
        model[4].weight.copy_(model[4].weight.abs() + 1.0)
    return model


def batches(count: int = 4, size: int = 16) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    for _ in range(count):
        yield SCALE * torch.randn(size, 3, 8, 8, generator=gen)


def train(model: nn.Module, steps: int, seed: int) -> float:
    """Adam, lr 0.05, MSE to a constant target on fresh inputs drawn from ``seed``; the last loss."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x = SCALE * torch.randn(16, 3, 8, 8, generator=gen)
        loss = (model(x).squeeze(1) - TARGET).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def eval_loss(model: nn.Module) -> float:
    """MSE to the target on the audit batches (lower is better)."""
    return float(sum((model(x).squeeze(1) - TARGET).pow(2).mean() for x in batches()) / 4)
