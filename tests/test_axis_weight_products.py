"""Layers written as tensor ops: a product of data with a weight (``x @ W``, ``W @ x + b``, ``einsum`` with a
parameter) produces one channel per output feature of the weight, as ``nn.Linear`` and a 1x1 conv do. The
channel axis is derived there, not guessed: with positions as many as channels, a guess read positions as
channels and missed the planted dead ones. Oracle: the pre-activations the model stored itself, reduced by
numpy along the dim the weight's output features occupy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

C = 12  # channels, and positions: a guess cannot tell them apart by size


class Products(nn.Module):
    """One of several ways to write a layer with a weight; channels 0-2 planted dead (bias -100)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        rows = form in ("W @ x", "torch.matmul(W, x)", "einsum oi,nil->nol")
        self.W = nn.Parameter(torch.randn(C, 5) if rows else torch.randn(5, C))
        self.b = nn.Parameter(torch.zeros(C, 1) if rows else torch.zeros(C))
        with torch.no_grad():
            self.b[:3] = -100.0
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.W, self.b
        z = {
            "x @ W": lambda: x @ W + b,
            "W @ x": lambda: W @ x + b,
            "torch.matmul(W, x)": lambda: torch.matmul(W, x) + b,
            "x @ W.T.T": lambda: x @ W.T.T + b,
            "einsum bld,df->blf": lambda: torch.einsum("bld,df->blf", x, W) + b,
            "einsum ...d,df": lambda: torch.einsum("...d,df", x, W) + b,  # implicit output: ...f
            "einsum oi,nil->nol": lambda: torch.einsum("oi,nil->nol", W, x) + b,
        }[self.form]()
        self.seen.append(z.detach().numpy().copy())
        return F.relu(z)


ROWS_FIRST = ("W @ x", "torch.matmul(W, x)", "einsum oi,nil->nol")  # channels at dim -2: (N, C, L)


@pytest.mark.parametrize("form", ["x @ W", "W @ x", "torch.matmul(W, x)", "x @ W.T.T", "einsum bld,df->blf",
                                  "einsum ...d,df", "einsum oi,nil->nol"])
def test_a_product_with_a_weight_fixes_the_channel_axis(form: str) -> None:
    torch.manual_seed(0)
    model = Products(form).eval()
    shape = (3, 5, C) if form in ROWS_FIRST else (3, C, 5)  # (N, C_in, L) or (N, L, C_in), L == C
    batches = [torch.randn(*shape) for _ in range(2)]
    report = deadneuron.audit(model, batches, progress=False)
    model.seen.clear()
    with torch.no_grad():
        for b in batches:
            model(b)
    axis = 1 if form in ROWS_FIRST else 2
    z = np.moveaxis(np.concatenate(model.seen), axis, -1).reshape(-1, C)
    site = report.sites["relu"]
    assert (site.channel_axis, site.axis_source) == (axis, "traced")  # the weight's product, then + b
    assert site.n == z.shape[0] == 2 * 3 * C
    assert list(site.dead_channels) == [c for c in range(C) if (z[:, c] <= 0).all()] == [0, 1, 2]
    np.testing.assert_allclose(site.channel_zero, (z <= 0).mean(0), rtol=0, atol=1e-12)
    assert not [f for f in report.findings if "guessed" in f.title.lower()]


class DataProducts(nn.Module):
    """Attention scores (data @ data) fix no channel axis; nor does a product of two weights (a low-rank W)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(C, 3))
        self.B = nn.Parameter(torch.randn(3, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.relu(x @ x.transpose(-1, -2))  # (N, L, L): positions against positions
        return F.relu((scores @ x) * (self.A @ self.B))  # elementwise with a weight: fixes nothing either


def test_products_without_exactly_one_weight_fix_nothing() -> None:
    torch.manual_seed(0)
    report = deadneuron.audit(DataProducts().eval(), [torch.randn(2, C, C)], progress=False)
    assert [report.sites[s].axis_source for s in ("relu#0", "relu#1")] == ["guessed", "guessed"]
    assert any("guessed" in f.title.lower() for f in report.findings)
