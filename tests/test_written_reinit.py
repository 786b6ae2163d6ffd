"""`deadneuron patch --reinit-dead` finds the layers around a site the audit names as written out (a GELU written
with torch.erf: ``fc>gelu``; ``h * torch.sigmoid(h)``: ``fc2>silu``), as it does around ``F.gelu``: before, those
sites were "not seen in the forward pass that maps layers to sites" and their fix was not suggested.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import deadneuron
from deadneuron.patch.reinit import dataflow, reinit_dead


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2, self.out = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[:10] = -30.0
            self.fc2.bias[:3] = -30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(gelu(self.fc(x)))
        return self.out(h * torch.sigmoid(h))


def test_dead_channels_of_written_sites_are_reinitialised_where_the_audit_names_them() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    report = deadneuron.audit(model, [x], progress=False)
    dead = {name: list(s.dead_channels) for name, s in report.sites.items()}
    assert dead == {"fc>gelu": list(range(10)), "fc2>silu": [0, 1, 2]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = reinit_dead(model, dead, dataflow(model, lambda m: m(x)))
    assert result.missing == []
    assert not torch.equal(model.fc.weight[:10], before["fc.weight"][:10])  # fresh incoming weights
    assert torch.equal(model.fc.weight[10:], before["fc.weight"][10:])
    # fc2: zero outgoing weights of fc>gelu's dead channels, then fresh rows for its own dead channels 0-2
    assert (model.fc2.weight[3:, :10] == 0).all() and torch.equal(model.fc2.weight[3:, 10:], before["fc2.weight"][3:, 10:])
    assert not torch.equal(model.fc2.weight[:3], before["fc2.weight"][:3])
    assert (model.out.weight[:, :3] == 0).all() and torch.equal(model.out.weight[:, 3:], before["out.weight"][:, 3:])
