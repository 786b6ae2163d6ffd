"""Per-site, per-channel figures equal a one-shot oracle over tensors the models stored themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from tests import zoo

# (model factory, batches, kinds whose flat thresholds are exact on both sides)
CASES = {
    "conv-bn-inplace-relu": (zoo.ConvBNInplace, lambda: zoo.image_batches()),
    "seed-shared-relu": (zoo.SeedEncoder, lambda: zoo.image_batches()),
    "functional-relu": (zoo.FunctionalCNN, lambda: zoo.image_batches()),
    "linear-gelu-mlp": (zoo.GeluMLP, lambda: [torch.randn(16, 12) for _ in range(3)]),
    "leaky-relu-mlp": (lambda tap: zoo.GeluMLP(tap, nn.LeakyReLU(0.01), "leaky_relu"), lambda: [torch.randn(16, 12) for _ in range(3)]),
    "tanh-mlp": (lambda tap: zoo.GeluMLP(tap, nn.Tanh(), "tanh"), lambda: [3 * torch.randn(16, 12) for _ in range(3)]),
    "transformer-block": (zoo.TransformerBlock, lambda: [torch.randn(2, 5, 16) for _ in range(3)]),
    "tuple-dict-outputs": (zoo.TupleDictOutputs, lambda: [torch.randn(7, 6) for _ in range(3)]),
    "called-three-times": (zoo.CalledThrice, lambda: [torch.randn(5, 8) for _ in range(3)]),
    "nan-layer": (zoo.NaNLayer, lambda: [torch.randn(6, 4) for _ in range(3)]),
    "inplace-silu-relu_-prelu": (zoo.InplaceMix, lambda: [torch.randn(9, 6) for _ in range(3)]),
}

# Thresholds the product derives on a 1e-3 grid: elements within that distance of the closed-form
# threshold may fall on either side, so smooth kinds compare flat counts with a small tolerance.
EXACT_FLAT = {"relu", "leaky_relu", "prelu"}


def _run(case: str) -> tuple[deadneuron.Report, zoo.Tap, nn.Module]:
    torch.manual_seed(0)
    factory, data = CASES[case]
    tap = zoo.Tap()
    model = factory(tap)
    batches = data()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        zoo.warm_batchnorm(model, batches)
    model.eval()
    tap.on = True
    with torch.no_grad():
        for b in batches:
            model(b)
    tap.on = False
    report = deadneuron.audit(model, batches, progress=False)
    return report, tap, model


@pytest.mark.parametrize("case", list(CASES))
def test_sites_match_oracle(case: str) -> None:
    report, tap, model = _run(case)
    assert list(report.sites) == tap.order, "one site per call place, in order of first call"
    for name, kind in model.sites.items():
        want = zoo.oracle(tap, name, kind)
        got = report.sites[name]
        assert got.kind == kind
        assert got.n == want.n
        assert got.channels == len(want.zero)
        np.testing.assert_array_equal(np.round(np.array(got.channel_zero) * got.n), want.zero, err_msg=name)
        np.testing.assert_array_equal(got.channel_nonfinite, want.nonfinite, err_msg=name)
        flat = np.round(np.array(got.channel_flat) * got.n)
        if kind in EXACT_FLAT:
            np.testing.assert_array_equal(flat, want.flat, err_msg=name)
        else:
            assert np.abs(flat - want.flat).max() <= max(2, 0.01 * want.n), name
        assert list(got.dead_channels) == want.dead, name
        assert list(got.dormant_channels) == want.dormant, name
        assert got.sparsity == pytest.approx(want.sparsity, abs=1e-12)


def test_shared_relu_is_four_sites_with_different_neurons() -> None:
    report, _tap, _ = _run("seed-shared-relu")
    names = [f"bn_layers.{i}>relu" for i in range(4)]
    assert list(report.sites) == names
    assert all(report.sites[n].module == "relu" for n in names)
    # merging the four layers channel-wise would be a different (wrong) answer
    rates = {tuple(np.round(report.sites[n].channel_flat, 6)) for n in names}
    assert len(rates) == 4


def test_nan_site_counts_nonfinite_and_is_not_dead() -> None:
    report, _tap, _ = _run("nan-layer")
    site = report.sites["act"]
    assert site.channel_nonfinite[1] == site.n  # every element of channel 1 is NaN
    assert site.nonfinite == site.n
    assert 1 not in site.dead_channels
    assert report.summary.nonfinite == site.n


def test_summary_sparsity_is_over_all_elements() -> None:
    report, tap, model = _run("seed-shared-relu")
    zeros = sum(zoo.oracle(tap, n, "relu").zero.sum() for n in model.sites)
    total = sum(zoo.oracle(tap, n, "relu").n * len(zoo.oracle(tap, n, "relu").zero) for n in model.sites)
    assert report.summary.sparsity == pytest.approx(zeros / total)
