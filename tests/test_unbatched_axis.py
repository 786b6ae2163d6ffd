"""Pooling, instance norm and pixel shuffle layers take unbatched inputs ((C, L), (C, H, W)): their output's
channel dim is then dim 0, not 1. The oracle is numpy over the pre-activations the model stored itself,
with a channel planted dead (every input of it negative) so that another axis gives another answer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron

C = 4
DEAD = 2


class _LayerThenReLU(nn.Module):
    """``layer`` on the input, then a ReLU; stores the layer's output (the ReLU's z)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.act = nn.ReLU()
        self.stored: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layer(x)
        self.stored.append(z.detach().clone())
        return self.act(z)


def _inputs(shape: tuple[int, ...], channel: int, *, scale: int = 1) -> list[torch.Tensor]:
    """Batches whose channels ``DEAD * scale ... (DEAD + 1) * scale - 1`` (on ``channel``) are all negative."""
    out = []
    for _ in range(3):
        x = torch.randn(shape)
        x.narrow(channel, DEAD * scale, scale).copy_(-1.0 - x.narrow(channel, DEAD * scale, scale).abs())
        out.append(x)
    return out


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int]] = {
    # layer, input shape, the input's channel dim, input channels per output channel
    "maxpool1d": (lambda: nn.MaxPool1d(2), (C, 6), 0, 1),
    "avgpool1d": (lambda: nn.AvgPool1d(2), (C, 6), 0, 1),
    "adaptive-avgpool1d": (lambda: nn.AdaptiveAvgPool1d(3), (C, 7), 0, 1),
    "maxpool2d": (lambda: nn.MaxPool2d(2), (C, 3, 6), 0, 1),
    "adaptive-maxpool2d": (lambda: nn.AdaptiveMaxPool2d((2, 2)), (C, 4, 5), 0, 1),
    "maxpool3d": (lambda: nn.MaxPool3d(2), (C, 2, 4, 6), 0, 1),
    "instancenorm1d": (lambda: nn.InstanceNorm1d(C, affine=True), (C, 3), 0, 1),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(C, affine=True), (C, 3, 5), 0, 1),
    "pixelshuffle": (lambda: nn.PixelShuffle(2), (4 * C, 3, 5), 0, 4),
    "maxpool1d-batched": (lambda: nn.MaxPool1d(2), (2, C, 6), 1, 1),
    "instancenorm1d-batched": (lambda: nn.InstanceNorm1d(C, affine=True), (2, C, 3), 1, 1),
    "pixelshuffle-batched": (lambda: nn.PixelShuffle(2), (2, 4 * C, 3, 5), 1, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_channel_dim_of_an_unbatched_layer_output_is_its_first(case: str) -> None:
    make, shape, channel, scale = CASES[case]
    torch.manual_seed(0)
    layer = make()
    if isinstance(layer, nn.InstanceNorm1d | nn.InstanceNorm2d):
        with torch.no_grad():
            layer.bias.fill_(0.1)
            layer.bias[DEAD] = -50.0  # instance norm centres every channel: the bias plants the dead one
    model = _LayerThenReLU(layer).eval()
    batches = _inputs(shape, channel, scale=scale)
    report = deadneuron.audit(model, batches, rules=False)
    z = np.concatenate([np.moveaxis(t.numpy(), channel, -1).reshape(-1, C) for t in model.stored[: len(batches)]])
    site = report.sites["act"]
    assert (site.channel_axis, site.channels, site.n) == (channel, C, z.shape[0])
    assert site.dead_channels == tuple(np.flatnonzero((z <= 0).all(0)).tolist()) == (DEAD,)
    np.testing.assert_allclose(site.channel_zero, (z <= 0).mean(0))
    np.testing.assert_allclose(site.channel_max, np.maximum(z, 0).max(0), rtol=1e-6)
