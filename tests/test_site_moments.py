"""A site's own mean and std (over all its channels) equal numpy's over the activations the model stored.

The per-channel moments are exact (tests/test_stats.py); these are the figures the report builds from
them for the whole site. Large offsets with a small spread are where a sum-of-squares shortcut
(E[a^2] - E[a]^2) cancels: the oracle is plain numpy over the stored activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron


class _Offset(nn.Module):
    """Linear -> scale and offset -> ReLU, storing the activations it produced."""

    def __init__(self, offset: float, scale: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6).to(dtype)
        self.act = nn.ReLU()
        self.offset, self.scale = offset, scale
        self.stored: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.lin(x) * self.scale + self.offset)
        self.stored.append(a.detach().clone())
        return a


@pytest.mark.parametrize(("offset", "scale", "dtype"), [
    (1e6, 1e-3, torch.float64), (1e8, 1.0, torch.float64), (3e5, 0.01, torch.float32), (1e6, 1.0, torch.float32),
    (0.0, 1.0, torch.float32),
])  # fmt: skip
def test_site_mean_and_std_equal_numpy_over_the_stored_activations(offset: float, scale: float,
                                                                      dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _Offset(offset, scale, dtype).eval()
    batches = [torch.randn(64, 4, dtype=dtype) for _ in range(3)]
    report = deadneuron.audit(model, batches, rules=False)
    values = np.concatenate([a.double().numpy().ravel() for a in model.stored[: len(batches)]])
    site = report.sites["act"]
    assert site.mean == pytest.approx(values.mean(), rel=1e-12)
    assert site.std == pytest.approx(values.std(), rel=1e-6)
    assert site.std > 0.1 * scale  # channels with different means: the site's spread is not zero


def test_site_moments_leave_out_nonfinite_channels_elements() -> None:
    """A channel holding +Inf and NaN: the site's moments cover the finite values of every channel."""
    torch.manual_seed(0)
    model = _Offset(5e5, 0.01, torch.float64).eval()
    with torch.no_grad():
        model.lin.bias[2] = float("inf")
        model.lin.weight[4, 0] = float("nan")
    batches = [torch.randn(32, 4, dtype=torch.float64) for _ in range(2)]
    report = deadneuron.audit(model, batches, rules=False)
    values = np.concatenate([a.numpy().ravel() for a in model.stored[: len(batches)]])
    finite = values[np.isfinite(values)]
    site = report.sites["act"]
    assert site.nonfinite == values.size - finite.size > 0
    assert site.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert site.std == pytest.approx(finite.std(), rel=1e-6)
