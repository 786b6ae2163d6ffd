"""A small conv+BatchNorm+ReLU classifier with two planted dead channels, for trying deadneuron.

    python examples/small_cnn.py                     # writes examples/small_cnn.pth
    deadneuron audit examples/small_cnn.pth --model examples/small_cnn.py:build --data examples/small_cnn.py:batches

Channels 3 and 7 of the second block are killed by a large negative BatchNorm bias, so the audit must
report exactly those two as dead and call the other layers healthy even though they are ~50% zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

DEAD = (3, 7)


def build(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


def batches(count: int = 8, size: int = 16) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(size, 3, 16, 16, generator=gen)


def make(path: Path) -> None:
    torch.manual_seed(0)
    model = build()
    model.train()
    with torch.no_grad():
        for x in batches():
            model(x)  # warm BatchNorm running statistics
        model[4].bias[list(DEAD)] = -50.0
    torch.save(model.state_dict(), path)


if __name__ == "__main__":
    make(Path(__file__).with_suffix(".pth"))
    print(f"wrote {Path(__file__).with_suffix('.pth')}")
