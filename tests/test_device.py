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
