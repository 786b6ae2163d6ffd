"""Activation checkpointing (`torch.utils.checkpoint`) runs a segment's forward again inside backward to
recompute what it did not keep. That recomputation is not a training batch: the monitor measures each
batch once, under the same site names as without checkpointing, and (non-reentrant checkpointing, the
default torch recommends) with the same gradient flow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import deadneuron


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.act(self.fc(x)))  # a functional activation too


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.b1, self.b2, self.out = Block(), Block(), nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.b1, self.b2):
            if self.mode == "none":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.out(x)


def _train(mode: str, steps: int = 6) -> tuple[pd.DataFrame, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(8, 12) for _ in range(steps)]
    with deadneuron.Monitor(model, every=3) as mon:
        for x in data:
            x = x.requires_grad_(mode == "reentrant")  # reentrant checkpointing needs an input that requires grad
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    return mon.timeline, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_recomputation_in_backward_is_not_measured(mode: str) -> None:
    plain, plain_params = _train("none")
    got, params = _train(mode)
    assert sorted(got["site"].unique()) == sorted(plain["site"].unique()) == [
        "b1.act", "b1.act>tanh", "b2.act", "b2.act>tanh"]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params, strict=True))  # training unchanged
    key = ["step", "site"]
    got, plain = got.sort_values(key).reset_index(drop=True), plain.sort_values(key).reset_index(drop=True)
    assert (got["n"] == plain["n"]).all() and (plain["n"] == 3 * 8).all()  # 3 batches of 8 per window
    for column in ("dead", "dormant", "sparsity", "flat_fraction", "abs_mean", "abs_max", "tau"):
        np.testing.assert_allclose(got[column], plain[column], rtol=1e-12, err_msg=column)
    if mode == "non-reentrant":  # the gradient reaches the tensors the first forward pass measured
        for column in [c for c in plain.columns if c.startswith("grad")]:
            np.testing.assert_allclose(got[column].astype(float), plain[column].astype(float), rtol=1e-12, err_msg=column)
