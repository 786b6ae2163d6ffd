"""An activation function applied to one of the model's parameters (softplus of a scale, sigmoid of a gate, relu of
a weight kept non-negative) is a weight transform, as a parametrization is: its entries are no activations of data,
and measured as a site they gave findings about "dead" or "stuck" channels that are parameters (a VAE's softplus of
a log-scale at -30 read as 16 stuck channels). They are left out, named in the warnings; an activation of data
computed from a parameter stays a site. A site whose input is 0-dim (a gate on a summed score) no longer stops
the audit's findings with an IndexError (the reinit check read its channel dim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import deadneuron


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(8, 16), nn.ReLU()
        self.raw_scale = nn.Parameter(torch.full((16,), -30.0))
        self.gate = nn.Parameter(torch.tensor(-20.0))
        self.w = nn.Parameter(torch.randn(4, 16))
        self.gate_act = nn.Sigmoid()  # an activation module, on a parameter and on data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x)) * F.softplus(self.raw_scale) * torch.sigmoid(self.gate) * self.gate_act(self.gate)
        h = h * self.gate_act(h[:, :1])
        h = F.linear(h, F.relu(self.w.view(4, 16)))  # a view of a parameter: non-negative weights
        return torch.tanh(h * self.raw_scale[:4].exp())  # data computed with a parameter: an activation


def test_activations_of_parameters_are_no_sites_and_are_named() -> None:
    torch.manual_seed(0)
    model, x = Head().eval(), torch.randn(5, 8)
    report = deadneuron.audit(model, [x], progress=False)
    assert sorted(s.kind for s in report.sites.values()) == ["relu", "sigmoid", "tanh"]
    with torch.no_grad():
        h = torch.relu(model.fc(x)) * F.softplus(model.raw_scale) * torch.sigmoid(model.gate) ** 2
        gate = h[:, :1]
        z = F.linear(h * torch.sigmoid(gate), F.relu(model.w)) * model.raw_scale[:4].exp()
    (on_data,) = [s for s in report.sites.values() if s.kind == "sigmoid"]  # the module's call on data only
    assert (on_data.n, on_data.channels) == (5, 1)
    assert abs(on_data.channel_mean[0] - float(torch.sigmoid(gate).mean())) < 1e-6
    (tanh,) = [s for s in report.sites.values() if s.kind == "tanh"]
    assert tanh.n == 5 and tanh.channels == 4
    assert abs(tanh.channel_mean[0] - float(torch.tanh(z)[:, 0].mean())) < 1e-6
    named = [w for w in report.meta["warnings"] if "() called in" in w and "on one of the model's parameters" in w]
    assert [w.split("()")[0] for w in named] == ["softplus", "sigmoid", "relu"]
    assert [w for w in report.meta["warnings"] if w.startswith("module 'gate_act' (Sigmoid) was called on one of the")]
    assert not [f for f in report.findings if any("softplus" in s or "sigmoid" in s for s in f.sites)]


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.fc.bias.fill_(-50.0)  # the gate stuck shut: a finding, whose fix is checked against the layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x).sum())  # a 0-dim activation of data


def test_a_0_dim_activation_of_data_is_a_site_of_one_channel_and_findings_run() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    report = deadneuron.audit(Gate().eval(), [x, x * 2], progress=False)
    (site,) = report.sites.values()
    assert (site.kind, site.channels, site.n) == ("sigmoid", 1, 2)
    assert [f.rule for f in report.findings if site.name in f.sites]  # the stuck gate is found
