"""Audits on an accelerator: statistics stay on the device, hooks never synchronise with the host,
and the figures equal the CPU audit. Skipped where no CUDA device is present (CI); run on a GPU box."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.probe import Recorder
from tests import zoo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = zoo.SeedEncoder(zoo.Tap(), channels=32)
    data = zoo.image_batches(4, (16, 3, 12, 12))
    zoo.warm_batchnorm(model, data)
    with torch.no_grad():
        model.bn_layers[2].bias[[1, 4, 9]] = -50.0
    return model


@cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_audit_equals_cpu(compile: bool) -> None:
    model = _model()
    data = zoo.image_batches(4, (16, 3, 12, 12))
    cpu = deadneuron.audit(model, data, progress=False, compile=compile)
    gpu = deadneuron.audit(model.cuda(), data, progress=False, compile=compile)
    assert next(model.parameters()).is_cuda, "the model stays where it was"
    assert gpu.meta["device"].startswith("cuda")
    for name, site in cpu.sites.items():
        other = gpu.sites[name]
        assert other.dead_channels == site.dead_channels
        assert other.channel_zero == site.channel_zero
        assert other.channel_flat == site.channel_flat
        assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(site.channel_mean, other.channel_mean, strict=True))
    assert gpu.sites["bn_layers.2>relu"].dead_channels == (1, 4, 9)


@cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_hooks_never_synchronise(compile: bool) -> None:
    model = _model().cuda().eval()
    data = [b.cuda() for b in zoo.image_batches(3, (16, 3, 12, 12))]
    with torch.inference_mode(), Recorder(model, compile=compile) as rec:
        rec.start_batch()
        model(data[0])  # first call compiles; compilation itself may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for b in data[1:]:
                rec.start_batch()
                model(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        states = [s.stats for s in rec._sites.values()]
        assert all(t.is_cuda for st in states for t in (st.zero, st.flat, st.sum, st.min))
        results = rec.results()
    assert [r.name for r in results] == [f"bn_layers.{i}>relu" for i in range(4)]


class _FunctionalPReLU(nn.Module):
    """Functional activations only, a functional per-channel PReLU among them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.slopes = nn.Parameter(torch.tensor([0.01, 0.25, 0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.conv(x)).mean((2, 3))
        return torch.nn.functional.prelu(self.fc(h), self.slopes).tanh()


def _sync_free_passes(model: nn.Module, batches: list[torch.Tensor], **recorder: bool) -> list[str]:
    model = model.cuda().eval()
    data = [b.cuda() for b in batches]
    with torch.inference_mode(), Recorder(model, **recorder) as rec:
        rec.start_batch()
        model(data[0])  # the first call creates state (and may compile)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for b in data[1:]:
                rec.start_batch()
                model(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [r.name for r in rec.results()]


@cuda
@pytest.mark.parametrize("histograms", [False, True], ids=["plain", "histograms"])
def test_functional_sites_and_histograms_never_synchronise(histograms: bool) -> None:
    torch.manual_seed(0)
    names = _sync_free_passes(
        _FunctionalPReLU(), [torch.randn(8, 3, 10, 10) for _ in range(3)], histograms=histograms, compile=False
    )
    assert names == ["conv>gelu", "fc>prelu", "tanh"]
    names = _sync_free_passes(zoo.FunctionalCNN(zoo.Tap()), zoo.image_batches(3), histograms=histograms, compile=False)
    assert names == ["conv1>relu", "conv2>relu", "conv3>relu"]


@cuda
def test_functional_prelu_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    model = _FunctionalPReLU()
    data = [torch.randn(8, 3, 10, 10) for _ in range(3)]
    cpu = deadneuron.audit(model, data, progress=False, compile=False)
    gpu = deadneuron.audit(model.cuda(), data, progress=False, compile=False)
    for name, site in cpu.sites.items():
        assert gpu.sites[name].channel_flat == site.channel_flat
        assert gpu.sites[name].dead_channels == site.dead_channels
