"""Models with parametrized weights (torch.nn.utils.parametrize, weight_norm, spectral_norm), pruning masks
and tied weights: a parametrization transforms a parameter, not an activation, so what it computes (a
``softplus`` keeping a weight positive, a ``relu`` on a bias, a ``Symmetric`` matrix) is no site and no
unknown activation; the activations are measured against numpy over the layers called by hand, and the
model (parametrizations, pruning hooks, tied weights) is left as found."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import nn
from torch.nn.utils import parametrizations, prune

import deadneuron


class Softplus(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(w)


class NonNegative(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(w)


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).mT


class ClampModule(nn.Module):  # a parametrization made of an activation module
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.act(w) - 0.5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(3, 6, 3, padding=1))
        self.fc1 = parametrizations.spectral_norm(nn.Linear(6, 8))
        self.fc2, self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 4)
        P.register_parametrization(self.fc2, "weight", Softplus())
        P.register_parametrization(self.fc2, "bias", NonNegative())
        P.register_parametrization(self.fc3, "weight", Symmetric())
        P.register_parametrization(self.fc3, "bias", ClampModule())
        self.fc4.weight = self.fc3.parametrizations.weight.original  # tied to fc3's unconstrained weight
        prune.l1_unstructured(self.out, "weight", amount=0.5)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).mean((2, 3))
        h = F.relu(self.fc1(h))
        h = self.act(self.fc2(h))
        h = torch.tanh(self.fc3(h))
        return self.out(F.relu(self.fc4(h)))


def _by_hand(model: Net, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(z, a) of every activation, each layer computed here from its parameters (no hook, no module call)."""
    conv, fc1 = model.conv, model.fc1
    z1 = F.conv2d(x, conv.weight, conv.bias, padding=1)
    h = torch.relu(z1).mean((2, 3))
    z2 = F.linear(h, fc1.weight, fc1.bias)
    z3 = F.linear(torch.relu(z2), F.softplus(model.fc2.parametrizations.weight.original),
                  torch.relu(model.fc2.parametrizations.bias.original))
    w = model.fc3.parametrizations.weight.original
    z4 = F.linear(torch.relu(z3), w.triu() + w.triu(1).mT, torch.relu(model.fc3.parametrizations.bias.original) - 0.5)
    z5 = F.linear(torch.tanh(z4), w)
    return {"conv>act": (z1, torch.relu(z1)), "fc1>relu": (z2, torch.relu(z2)), "fc2>act": (z3, torch.relu(z3)),
            "fc3>tanh": (z4, torch.tanh(z4)), "fc4>relu": (z5, torch.relu(z5))}


def _channels(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().movedim(1, -1).reshape(-1, t.shape[1]).numpy() for t in tensors])


def _model() -> Net:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(torch.randn(4, 3, 5, 5)).square().mean().backward()  # spectral norm's power iteration runs, grads exist
    opt.step()
    return model.eval()


def test_parametrizations_are_no_sites_and_the_activations_match_numpy() -> None:
    model = _model()
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    with torch.no_grad():
        seen = [_by_hand(model, x) for x in batches]
    report = deadneuron.audit(model, batches, rules=False)
    assert list(report.sites) == list(seen[0]), "the weights' softplus, relu and clamp are no activation sites"
    assert report.warnings == (), "a parametrization is no unknown activation"
    for name, site in report.sites.items():
        z, a = _channels([s[name][0] for s in seen]), _channels([s[name][1] for s in seen])
        assert site.n == z.shape[0], name
        np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), (a == 0).sum(0), err_msg=name)
        if site.kind == "relu":
            np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), (z <= 0).sum(0), err_msg=name)
        np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_model_is_left_as_found() -> None:
    model = _model()
    params = {k: (p.detach().clone(), p.grad.clone()) for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    deadneuron.audit(model, [torch.randn(4, 3, 5, 5)])
    assert all(torch.equal(p, params[k][0]) and torch.equal(p.grad, params[k][1]) for k, p in model.named_parameters())
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert P.is_parametrized(model.fc2, "weight") and P.is_parametrized(model.fc3, "bias")
    assert model.fc4.weight is model.fc3.parametrizations.weight.original
    assert len(model.out._forward_pre_hooks) == 1 and hasattr(model.out, "weight_mask")  # the pruning hook
    assert all(not m._forward_hooks and len(m._forward_pre_hooks) == (m is model.out) for m in model.modules())


def test_monitor_measures_the_activations_only() -> None:
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    seen = []
    with deadneuron.Monitor(model, every=None, optimizer=opt) as mon:
        for x in batches:
            with torch.no_grad():
                seen.append(_by_hand(model, x))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            mon.step()
        snap = mon.snapshot()
    assert snap is not None and list(snap.sites) == list(seen[0])
    assert mon.warnings == []
    for name in ("conv>act", "fc2>act", "fc4>relu"):
        z = _channels([s[name][0] for s in seen])
        assert set(snap.sites[name].dead_channels) == set(np.flatnonzero((z <= 0).all(0)).tolist()), name
