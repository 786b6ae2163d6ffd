"""Gradient flow and the tau-dormant ratio of deadneuron.Monitor against independent oracles: dL/dz from
torch.autograd.grad on the pre-activations a twin model stored itself, and numpy over its outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.gradflow import tau_scores
from tests.monitor_models import teacher_batches

STEPS = 4
SITES = ("conv>gelu", "relu", "leaky")


class FlowNet(nn.Module):
    """GELU on NCHW, an in-place ReLU (or, in the twin, an out-of-place one: the same gradients), and a
    LeakyReLU on (N, C) features whose channel 3 is masked off downstream: it gets exactly zero gradient.
    Channel 0 of the conv and channels 0-1 of ``fc`` are scaled down to plant tau-dormant units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 12)
        self.leaky = nn.LeakyReLU(0.1)
        self.out = nn.Linear(12, 10)
        mask = torch.ones(12)
        mask[3] = 0.0
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.conv.weight[0] *= 1e-3
            self.conv.bias[0] = 0.0
            self.fc.weight[:2] *= 1e-3
            self.fc.bias[:2] = 0.0
        self.keep: dict[str, list[torch.Tensor]] | None = None  # the twin stores z (with its graph) and a

    def _stored(self, key: str, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            self.keep.setdefault(f"z:{key}", []).append(z)
            self.keep.setdefault(f"a:{key}", []).append(a.detach().clone())
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        h = self._stored("conv>gelu", z, F.gelu(z))
        z = self.mid(h)
        h = self._stored("relu", z, F.relu(z) if self.keep is not None else self.relu(z))
        z = self.fc(h.mean((2, 3)))
        h = self._stored("leaky", z, self.leaky(z))
        return self.out(h * self.mask)


def _runs(tau: float = 0.1) -> tuple[deadneuron.Monitor, dict[str, list[torch.Tensor]], dict[str, list[np.ndarray]]]:
    torch.manual_seed(0)
    model = FlowNet()
    twin = copy.deepcopy(model)
    twin.keep = {}
    opt, opt_twin = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, twin))
    grads: dict[str, list[np.ndarray]] = {}
    batches = teacher_batches(STEPS, batch=6, side=5)
    with deadneuron.Monitor(model, every=STEPS, optimizer=opt, tau=tau) as mon:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    for x, y in batches:
        twin.keep = {}
        loss = F.cross_entropy(twin(x), y)
        zs = [twin.keep[f"z:{s}"][0] for s in SITES]
        for site, g in zip(SITES, torch.autograd.grad(loss, zs, retain_graph=True), strict=True):
            grads.setdefault(site, []).append(g.numpy())
        outputs = {k: v for k, v in twin.keep.items() if k.startswith("a:")}
        opt_twin.zero_grad()
        loss.backward()
        opt_twin.step()
        for k, v in outputs.items():
            grads.setdefault(k, []).append(v[0].numpy())
    return mon, twin.keep, grads


def _per_channel(arrays: list[np.ndarray]) -> np.ndarray:
    """(steps x N, C, positions) from (N, C, ...) arrays of every step."""
    return np.concatenate([a.reshape(a.shape[0], a.shape[1], -1) for a in arrays])


def test_gradient_flow_matches_autograd_grad_on_the_stored_pre_activations() -> None:
    mon, _, stored = _runs()
    (snap,) = mon.snapshots
    for site in SITES:
        g = _per_channel(stored[site])
        elements = g.shape[0] * g.shape[2]
        nonzero = (g != 0).sum(axis=(0, 2)) / elements
        abs_mean = np.abs(g).astype(np.float64).sum(axis=(0, 2)) / elements
        detail = mon.last_channels[site]
        assert detail.grad_nonzero is not None and detail.grad_abs_mean is not None
        np.testing.assert_array_equal(detail.grad_nonzero, nonzero, err_msg=site)
        np.testing.assert_allclose(detail.grad_abs_mean, abs_mean, rtol=1e-5, err_msg=site)
        assert snap.sites[site].grad_elements == elements
        assert set(snap.sites[site].not_learning_channels) == set(np.flatnonzero(nonzero == 0).tolist())
        assert snap.sites[site].grad_nonzero == pytest.approx(nonzero.mean())
    assert snap.sites["leaky"].not_learning_channels == (3,)  # masked off downstream
    assert snap.sites["relu"].grad_nonzero < 0.9  # ReLU: zero gradient where z <= 0


def test_not_learning_is_a_finding_naming_the_masked_channel() -> None:
    mon, _, _ = _runs()
    found = {f.rule: f for f in mon.findings()}
    assert dict(found["not-learning"].channels) == {"leaky": (3,)}


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_tau_dormant_matches_numpy_over_the_stored_outputs(tau: float) -> None:
    mon, _, stored = _runs(tau)
    (snap,) = mon.snapshots
    for site in SITES:
        a = _per_channel(stored[f"a:{site}"]).astype(np.float64)
        mean_abs = np.abs(a).mean(axis=(0, 2))
        score = mean_abs / mean_abs.mean()
        np.testing.assert_allclose(mon.last_channels[site].tau_score, score, rtol=1e-5, err_msg=site)
        assert set(snap.sites[site].tau_dormant_channels) == set(np.flatnonzero(score <= tau).tolist()), site
    assert {0} <= set(snap.sites["conv>gelu"].tau_dormant_channels)
    assert {0, 1} <= set(snap.sites["leaky"].tau_dormant_channels)


def test_tau_scores_edge_cases() -> None:
    assert tau_scores(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # a silent layer: every unit dormant
    assert np.isnan(tau_scores(np.array([1.0, np.inf]))).all()  # non-finite: no verdict
    assert tau_scores(np.array([1.0, 3.0])).tolist() == [0.5, 1.5]


def test_no_gradient_hooks_without_grad_and_with_gradients_off() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    with deadneuron.Monitor(model, every=10, gradients=False) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    with deadneuron.Monitor(model, every=10) as mon2, torch.no_grad():
        model(torch.randn(3, 4))
        mon2.step()
    for m in (mon, mon2):
        (site,) = m.snapshots[0].sites.values()
        assert site.grad_elements == 0 and np.isnan(site.grad_nonzero) and site.not_learning_channels is None  # not measured, not "none"
        assert site.n == 3  # the activations were measured
