"""An input fed without a batch dim is one sample: a (6,) tensor to a model whose first layer is
``nn.Linear(6, 4)`` (it reads it as one row), a (C, L) tensor to ``nn.Conv1d`` (one sequence). The report's
sample count is checked against the count the model itself keeps of what its first layer read (one for
an input of the rank the layer takes unbatched, else the leading dim), and against the rows its activation
saw; a 1-D batch whose first layer does see a batch dim ((N,) scalars, (N,) token ids) keeps N."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deadneuron


class Counting(nn.Module):
    """``first`` -> ReLU, counting the samples ``first`` read: one for an input of ``unbatched_rank``
    (the rank ``first`` takes without a batch dim), else its leading dim."""

    def __init__(self, first: nn.Module, unbatched_rank: int, *, prepare: Any = None) -> None:
        super().__init__()
        self.first, self.act = first, nn.ReLU()
        self.unbatched_rank, self.prepare = unbatched_rank, prepare
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x) if self.prepare is not None else x
        self.samples += 1 if x.dim() == self.unbatched_rank else x.shape[0]
        return self.act(self.first(x))


def _notes(report: deadneuron.Report) -> list[str]:
    return [n for n in report.meta.get("notes", ()) if "counted as one sample" in n]


def test_a_1d_input_to_a_linear_layer_is_one_sample() -> None:
    model = Counting(nn.Linear(6, 4), 1)
    report = deadneuron.audit(model, [torch.randn(6), torch.randn(3, 6), torch.randn(6)], rules=False)
    assert report.meta["samples"] == model.samples == report.sites["act"].n == 5
    (note,) = _notes(report)
    assert note.startswith("2 batches counted as one sample each: the input had no batch dim")


def test_a_1d_input_in_a_dict_batch_is_one_sample() -> None:
    class Keyword(Counting):
        def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)

    model = Keyword(nn.Linear(6, 4), 1)
    report = deadneuron.audit(model, [{"x": torch.randn(6), "step": 3}], rules=False)
    assert report.meta["samples"] == model.samples == 1


@pytest.mark.parametrize("shape", [(4, 7), (2, 4, 7)])
def test_an_unbatched_sequence_to_a_conv_layer_is_one_sample(shape: tuple[int, ...]) -> None:
    model = Counting(nn.Conv1d(4, 3, 3), 2)
    report = deadneuron.audit(model, [torch.randn(shape), torch.randn(3, 4, 7)], rules=False)
    assert report.meta["samples"] == model.samples == (1 if len(shape) == 2 else 2) + 3
    assert bool(_notes(report)) == (len(shape) == 2)


@pytest.mark.parametrize("case", ["scalars", "token-ids"])
def test_a_1d_batch_whose_first_layer_sees_a_batch_dim_keeps_its_length(case: str) -> None:
    if case == "scalars":
        model = Counting(nn.Linear(1, 4), 1, prepare=lambda x: x.unsqueeze(-1))
        batches = [torch.randn(5), torch.randn(3)]
    else:
        model = Counting(nn.Embedding(10, 4), 0)
        batches = [torch.randint(0, 10, (5,)), torch.randint(0, 10, (3,))]
    report = deadneuron.audit(model, batches, rules=False)
    assert report.meta["samples"] == model.samples == report.sites["act"].n == 8
    assert not _notes(report)
