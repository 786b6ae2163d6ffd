"""Monitor arguments that cannot work are refused when the Monitor is made (UsageError naming the argument),
not at the first snapshot, steps into training, with an AttributeError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.errors import UsageError


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_a_model_that_is_no_module_is_refused() -> None:
    with pytest.raises(UsageError, match=r"Monitor: model must be a torch\.nn\.Module, got str"):
        deadneuron.Monitor("model.pth", every=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("wrong", ["adam", torch.optim.Adam, "scheduler"])
def test_an_optimizer_without_parameter_groups_is_refused_up_front(wrong: object) -> None:
    model = _model()
    if wrong == "scheduler":  # an easy slip: the scheduler in place of its optimizer
        wrong = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), step_size=1)
    with pytest.raises(UsageError, match=r"Monitor: optimizer must be a torch\.optim\.Optimizer"):
        deadneuron.Monitor(model, every=2, optimizer=wrong)  # type: ignore[arg-type]


def test_an_optimizer_is_read_at_each_snapshot() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    with deadneuron.Monitor(model, every=1, optimizer=opt) as mon:
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        mon.step()
    assert [s.learning_rate for s in mon.snapshots] == [0.25]
