"""An activation of the user's own class whose name does not say so (``Squash``) is not skipped silently:
a leaf of their own class holding nothing, seen returning a floating tensor shaped as its one input, is
named in a warning; layout, noise and bookkeeping modules of the same shape, modules holding parameters or
buffers, registered kinds and modules whose inside is measured are not."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deadneuron


class Squash(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + x.abs())


class Bent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.sqrt(x * x + 1) - 1) / 2 + x


class DropPath(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


class Tap(nn.Module):
    """Bookkeeping: returns its input itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.g


class Shifted(nn.Module):
    """Computes a recognised function inside: measured through it (a site of its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - 1)


class Net(nn.Module):
    def __init__(self, *middle: nn.Module) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.middle = nn.ModuleList(middle)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inp(x))
        for m in self.middle:
            x = m(x)
        return self.out(x)


def _said(report: deadneuron.Report) -> list[str]:
    return [w for w in report.meta["warnings"] if "of your own class" in w]


def test_activations_of_unknown_name_are_named() -> None:
    report = deadneuron.audit(Net(Squash(), Bent()), [torch.randn(4, 8)], rules=False)
    (said,) = _said(report)
    assert "'middle.0' (Squash)" in said and "'middle.1' (Bent)" in said and "register_activation" in said
    assert not any(s.module.startswith("middle") for s in report.sites.values())  # not measured: said so


@pytest.mark.parametrize("middle", [DropPath, Scale, Tap, Gain, Shifted], ids=lambda c: c.__name__)
def test_modules_that_are_no_unmeasured_activation_say_nothing(middle: type[nn.Module]) -> None:
    report = deadneuron.audit(Net(middle()), [torch.randn(4, 8)], rules=False)
    assert _said(report) == []


def test_a_registered_kind_is_measured_not_named() -> None:
    registry = deadneuron.ActivationRegistry()
    registry.register(Squash, lambda x: x / (1 + x.abs()))
    report = deadneuron.audit(Net(Squash()), [torch.randn(4, 8)], rules=False, activations=registry)
    assert _said(report) == []
    (site,) = [s for s in report.sites.values() if s.module == "middle.0"]
    assert site.n == 4 and math.isfinite(site.mean)


def test_a_suspect_never_called_or_called_otherwise_is_not_named() -> None:
    class Pair(nn.Module):  # two tensors in: a combination, not an activation
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * y

    class Uses(Net):
        def __init__(self) -> None:
            super().__init__(Squash())
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pair(self.act(self.inp(x)), x)

    assert _said(deadneuron.audit(Uses(), [torch.randn(4, 8)], rules=False)) == []
