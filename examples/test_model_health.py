"""A model's activation health as pytest assertions.

    pytest examples/test_model_health.py
    pytest examples/test_model_health.py --deadneuron-report-dir reports/tests   # keep each audit's report

``assert_healthy`` and ``assert_sparsity_below`` take a model with its data (they audit it) or a Report.
The ``activation_audit`` fixture (from deadneuron's pytest plugin, installed with deadneuron) audits a
model once per test session, so several assertions about one model cost one audit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deadneuron.testing import assert_healthy, assert_sparsity_below


class TinyNet(nn.Module):
    """conv -> BatchNorm -> ReLU, twice, then a linear head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def make_batches(count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(count)]


def make_model(*, dead: tuple[int, ...] = ()) -> TinyNet:
    """A model with warmed-up BatchNorm statistics; ``dead`` channels of act2 killed by a large negative bias."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for x in make_batches():
            model(x)
        model.bn2.bias[list(dead)] = -50.0
    return model.eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return make_batches()


@pytest.fixture(scope="module")
def model() -> TinyNet:
    return make_model()


def test_no_dead_channels(model: TinyNet, batches: list[torch.Tensor]) -> None:
    assert_healthy(model, batches)  # audits the model; default: no dead channel in any site


def test_sparsity_budget(activation_audit, model: TinyNet, batches: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    report = activation_audit(model, batches)  # audited once per session, shared with the next test
    assert_sparsity_below(report, 0.65)


def test_scoped_to_one_site(activation_audit, model: TinyNet, batches: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    report = activation_audit(model, batches)
    assert_healthy(report, sites=["act2"], max_dead_fraction=0.0, max_sparsity=0.65)


@pytest.mark.xfail(reason="shows the failure message: act2 has two dead channels", strict=True)
def test_a_planted_dead_channel_fails(batches: list[torch.Tensor]) -> None:
    assert_healthy(make_model(dead=(3, 5)), batches)
    # AssertionError: TinyNet is not healthy: 1 violated check
    #   act2: 2 of 8 channels dead (25.0%: 3, 5) > max_dead_fraction 0.0%
