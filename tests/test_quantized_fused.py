"""A quantized fused module (torch.ao's LinearReLU after quantize_dynamic) computes its ReLU inside its own
kernel: the warning says so and says to audit the float model, not to register an elementwise function; the
float model's ReLU, fused or not, is measured."""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn
from torch.ao.quantization import fuse_modules, quantize_dynamic

import deadneuron

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch", "ignore:torch.ao.quantization is deprecated:DeprecationWarning")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).eval()


def test_a_quantized_fused_relu_is_named_with_what_to_do() -> None:
    fused = fuse_modules(_model(), [["0", "1"]])
    quantized = quantize_dynamic(fused, {nn.Linear, nni.LinearReLU}, dtype=torch.qint8)
    report = deadneuron.audit(quantized, [torch.randn(4, 8)], rules=False)
    (said,) = [w for w in report.meta["warnings"] if "LinearReLU" in w]
    assert "inside its own kernel" in said and "before quantization" in said and "register_activation" not in said
    assert list(report.sites) == ["3"]


def test_the_float_model_fused_or_not_is_measured() -> None:
    x = torch.randn(4, 8)
    plain = deadneuron.audit(_model(), [x], rules=False)
    fused = deadneuron.audit(fuse_modules(_model(), [["0", "1"]]), [x], rules=False)
    assert len(plain.sites) == len(fused.sites) == 2
    assert [s.channel_mean for s in plain.sites.values()] == [s.channel_mean for s in fused.sites.values()]
