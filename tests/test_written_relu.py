"""ReLUs written by hand: ``torch.where(x > 0, x, 0.1 * x)``, ``torch.maximum(x, torch.zeros_like(x))``. Such a
model's nonlinearity was no site at all: with another activation beside it, its layer went unmeasured without a
word; alone, the audit refused (no site). The probe reads the expression at the ``where`` or ``maximum`` call
(`deadneuron.probe.written`) and measures it as the ReLU or leaky ReLU it equals on a grid.

Oracle: numpy over the pre-activations the test's own hook stored, with planted dead channels (a bias far
below zero); a ``where`` that chooses between two tensors (a gate, a padding fill) is no site."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron

DEAD = (1, 4)
FORMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str, float]] = {
    # form, kind, slope (relu: 0)
    "where leaky": (lambda h: torch.where(h > 0, h, 0.1 * h), "leaky_relu", 0.1),
    "where zeros": (lambda h: torch.where(h > 0, h, torch.zeros_like(h)), "relu", 0.0),
    "maximum zeros": (lambda h: torch.maximum(h, torch.zeros_like(h)), "relu", 0.0),
    "method where": (lambda h: h.where(h >= 0, 0.02 * h), "leaky_relu", 0.02),
}


class Net(nn.Module):
    def __init__(self, form: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc, self.out, self.form = nn.Linear(6, 8), nn.Linear(8, 3), form
        with torch.no_grad():
            self.fc.bias[list(DEAD)] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.form(self.fc(x))))  # a tanh beside it: another site


@pytest.mark.parametrize("form", list(FORMS))
def test_a_relu_written_by_hand_is_measured_as_one(form: str) -> None:
    fn, kind, slope = FORMS[form]
    torch.manual_seed(0)
    model = Net(fn).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 6, generator=g) for _ in range(3)]
    stored: list[np.ndarray] = []
    hook = model.fc.register_forward_hook(lambda m, a, o: stored.append(o.detach().double().numpy().copy()))
    with torch.no_grad():
        plain = [model(b) for b in batches]
    hook.remove()
    report = deadneuron.audit(model, batches, progress=False, rules=False)
    with torch.no_grad():
        assert all(torch.equal(model(b), p) for b, p in zip(batches, plain, strict=True))  # the model unchanged
    site = report.sites[f"fc>{kind}"]
    assert site.kind == kind and "written=" in site.label and report.meta["warnings"] == []
    z = np.concatenate(stored)
    a = np.where(z > 0, z, slope * z)
    assert site.n == z.shape[0]
    np.testing.assert_array_equal(np.rint(np.array(site.channel_zero) * site.n), (a == 0).sum(0))
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-6, atol=1e-9)
    if slope <= 0.05:  # flat below zero (DESIGN: slope <= delta x its largest, 1): the planted channels dead
        np.testing.assert_array_equal(np.rint(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
        assert list(site.dead_channels) == list(DEAD) == np.flatnonzero((z <= 0).all(0)).tolist()
    else:  # a slope over delta (0.05) is no flat region: nothing dead, as an nn.LeakyReLU of that slope
        assert site.flat_region == "none" and list(site.dead_channels) == []


def test_a_where_between_two_tensors_is_no_site() -> None:
    """A gate or a padding fill (`torch.where(mask, scores, fill)`) reads two variables: not an activation."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(6, 8), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            fill = torch.full_like(h, -1.0)
            return self.act(torch.where(x[:, :1] > 0, h, fill))

    report = deadneuron.audit(Gated().eval(), [torch.randn(8, 6)], progress=False, rules=False)
    assert list(report.sites) == ["act"]
