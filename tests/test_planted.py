"""Channels killed by a large negative BatchNorm bias are reported dead: exactly those, no others."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deadneuron
from tests import zoo

PLANTED = {0: [2], 1: [0, 5], 2: [], 3: [1, 3, 7]}


def _kill(bn: nn.BatchNorm2d, channels: list[int], value: float) -> None:
    with torch.no_grad():
        bn.bias[channels] = value


ACTIVATIONS = {
    "relu": (nn.ReLU, -50.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.01), -50.0),
    "gelu": (nn.GELU, -50.0),
    "silu": (nn.SiLU, -50.0),
    # Tanh is flat in both tails: a saturated channel is dead although its output is -1, not 0
    "tanh": (nn.Tanh, -50.0),
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_planted_dead_channels(kind: str) -> None:
    torch.manual_seed(0)
    make, bias = ACTIVATIONS[kind]
    model = zoo.SeedEncoder(zoo.Tap(), make(), kind)
    data = zoo.image_batches(4, (8, 3, 8, 8))
    zoo.warm_batchnorm(model, data)
    for layer, channels in PLANTED.items():
        _kill(model.bn_layers[layer], channels, bias)
    report = deadneuron.audit(model, data, progress=False)
    for layer, channels in PLANTED.items():
        site = report.sites[f"bn_layers.{layer}>relu"]
        assert list(site.dead_channels) == channels, (kind, layer)
        assert site.kind == kind
    assert report.summary.dead == sum(len(c) for c in PLANTED.values())
    if kind == "tanh":
        site = report.sites["bn_layers.1>relu"]
        assert site.channel_zero[0] == 0.0 and site.channel_flat[0] == 1.0  # flat, not zero


def test_leaky_relu_dormant_channels_are_not_sparse() -> None:
    """LeakyReLU: exact zeros vanish by definition while the neurons stay just as negative."""
    torch.manual_seed(0)
    data = zoo.image_batches(4, (8, 3, 8, 8))
    reports = {}
    for kind, act in (("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(0.01))):
        torch.manual_seed(0)
        model = zoo.SeedEncoder(zoo.Tap(), act, kind)
        zoo.warm_batchnorm(model, data)
        _kill(model.bn_layers[1], [0, 5], -50.0)
        reports[kind] = deadneuron.audit(model, data, progress=False)
    relu, leaky = reports["relu"].summary, reports["leaky_relu"].summary
    assert leaky.sparsity == 0.0 < relu.sparsity
    # the first layer sees the same input under both: same negative share, zero sparsity only for leaky
    first_relu, first_leaky = (reports[k].sites["bn_layers.0>relu"] for k in ("relu", "leaky_relu"))
    assert first_leaky.flat_fraction == pytest.approx(first_relu.flat_fraction)
    assert first_relu.sparsity == pytest.approx(first_relu.flat_fraction)
    assert reports["leaky_relu"].sites["bn_layers.1>relu"].dead_channels == (0, 5)


def test_healthy_batchnorm_relu_is_half_zeros_and_not_dead() -> None:
    torch.manual_seed(0)
    model = zoo.SeedEncoder(zoo.Tap(), channels=16)
    data = zoo.image_batches(6, (16, 3, 10, 10))
    zoo.warm_batchnorm(model, data)
    report = deadneuron.audit(model, data, progress=False)
    assert 0.4 < report.summary.sparsity < 0.6
    assert report.summary.dead == 0


def test_untracked_batchnorm_is_warned() -> None:
    model = zoo.SeedEncoder(zoo.Tap())
    report = deadneuron.audit(model, zoo.image_batches(1), progress=False)
    assert any("num_batches_tracked" in w for w in report.warnings)
