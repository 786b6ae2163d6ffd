"""The report's sample count is the number of samples the model was fed (counted by the model itself)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deadneuron


class _Counting(nn.Module):
    """Linear -> ReLU over ``x``, counting the rows it was fed; other keyword arguments are ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.act = nn.ReLU()
        self.rows = 0

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.act(self.lin(x))


@pytest.mark.parametrize("first", [
    {"text": ["a", "b", "c"]},                 # a collated batch of strings beside the tensors
    {"step": 7},                               # a plain number
    {"step": torch.tensor(7)},                 # a 0-dim tensor is no batch of samples
    {"names": ("u", "v", "w"), "meta": None},
])  # fmt: skip
def test_dict_batches_count_the_samples_of_their_first_batched_tensor(first: dict[str, Any]) -> None:
    model = _Counting()
    batches = [{**first, "x": torch.randn(3, 4)}, {**first, "x": torch.randn(2, 4)}]
    report = deadneuron.audit(model, batches, rules=False)
    assert report.meta["samples"] == model.rows == 5
    assert report.sites["act"].n == 5


def test_tuple_batches_count_their_input_rows() -> None:
    model = _Counting()
    report = deadneuron.audit(model, [(torch.randn(3, 4), ["a", "b", "c"]), (torch.randn(4, 4), ["d"] * 4)],
                              rules=False)  # fmt: skip
    assert report.meta["samples"] == model.rows == 7
