"""Models that carry forward hooks and pre-hooks of their own, which change what a layer takes or returns:
the audit measures what the model computes (an activation's input after the model's pre-hooks changed it,
its output as the activation returned it, before the model's forward hooks change it, for every kind
alike), against numpy over the layers called by hand, and the model's hooks stay and keep working."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

KINDS = {"relu": nn.ReLU, "relu_": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh,
         "leaky_relu": lambda: nn.LeakyReLU(0.1)}
FUNCTIONS = {"relu": torch.relu, "relu_": torch.relu, "gelu": F.gelu, "tanh": torch.tanh,
             "leaky_relu": lambda z: F.leaky_relu(z, 0.1)}


class Hooked(nn.Module):
    """fc1 -> act -> fc2, with the model's own hooks: fc1's output doubled, act's input shifted by -0.3,
    act's output scaled and shifted (3a + 1), fc2's input halved (a pre-hook with keyword arguments)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), KINDS[kind](), nn.Linear(8, 3)
        self.calls = 0
        self.fc1.register_forward_hook(lambda m, args, out: out * 2.0)
        self.act.register_forward_pre_hook(lambda m, args: (args[0] - 0.3,))
        self.act.register_forward_hook(self._count)
        self.act.register_forward_hook(lambda m, args, out: out * 3.0 + 1.0)
        self.fc2.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * 0.5,), kwargs), with_kwargs=True)

    def _count(self, m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _by_hand(model: Hooked, kind: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    z = F.linear(x, model.fc1.weight, model.fc1.bias) * 2.0 - 0.3
    a = FUNCTIONS[kind](z)
    out = F.linear((a * 3.0 + 1.0) * 0.5, model.fc2.weight, model.fc2.bias)
    return z.double().numpy(), a.double().numpy(), out


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_activation_is_measured_as_the_model_computes_it(kind: str) -> None:
    torch.manual_seed(0)
    model = Hooked(kind).eval()
    batches = [torch.randn(7, 6) for _ in range(3)]
    with torch.no_grad():
        seen = [_by_hand(model, kind, x) for x in batches]
        assert all(torch.allclose(model(x), out, atol=1e-6) for x, (_, _, out) in zip(batches, seen, strict=True))
    model.calls = 0
    report = deadneuron.audit(model, batches, rules=False)
    site = report.sites["act"]
    z, a = np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen])
    assert site.n == len(z)
    np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), (a == 0).sum(0))
    if kind in ("relu", "relu_"):
        np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
        assert list(site.dead_channels) == np.flatnonzero((z <= 0).all(0)).tolist()
    elif kind == "leaky_relu":  # slope 0.1 > delta 0.05 x its maximum: no flat region
        assert max(site.channel_flat) == 0
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(site.channel_min, a.min(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(site.channel_max, a.max(0), rtol=1e-5, atol=1e-6)
    assert model.calls == len(batches), "the model's own hooks ran on every batch"
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in (model.fc1, model.act, model.fc2)]
    assert hooks == [(1, 0), (2, 1), (0, 1)], "the model's hooks are left, and no other"
    with torch.no_grad():
        assert torch.allclose(model(batches[0]), seen[0][2], atol=1e-6), "and they still act"


def test_the_monitor_measures_the_same_figures() -> None:
    torch.manual_seed(0)
    model = Hooked("gelu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    a_seen = []
    with deadneuron.Monitor(model, every=None, optimizer=opt) as mon:
        for _ in range(3):
            x = torch.randn(5, 6)
            with torch.no_grad():
                a_seen.append(_by_hand(model, "gelu", x)[1])
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            mon.step()
        mon.snapshot()
    a = np.concatenate(a_seen)
    np.testing.assert_allclose(mon.last_health["act"].channel_mean, a.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mon.last_channels["act"].abs_mean, np.abs(a).mean(0), rtol=1e-5, atol=1e-6)
    assert model.calls == 3 and len(model.act._forward_hooks) == 2
