"""Truth for models that take gradients inside their forward pass: forces as -dE/dx (an interatomic potential,
an energy-based model) with ``torch.func.grad`` or with ``torch.autograd.grad`` inside ``torch.enable_grad()``
(physics-informed networks). The first stopped on "Cannot access data pointer of Tensor that doesn't have
storage" (an activation's input inside torch.func.grad is a wrapper); the second on "element 0 of tensors does
not require grad" (the audit's torch.inference_mode forbids autograd whatever the grad mode). Now the first is
measured on the plain tensor under the wrapper, the second audited under torch.no_grad, which the report says;
the first batch is fed again, no batch is counted twice, and a generator's batches are each taken once.

The oracle is numpy over the pre-activations the test computes itself with the same layers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

import deadneuron
from deadneuron.errors import AuditRuntimeError


class Forces(nn.Module):
    """Energy MLP (Linear + Softplus + Linear); the forward returns the forces -dE/dx."""

    def __init__(self, functorch: bool) -> None:
        super().__init__()
        self.functorch = functorch
        self.fc, self.act, self.out = nn.Linear(3, 12), nn.Softplus(), nn.Linear(12, 1)
        with torch.no_grad():
            self.fc.bias[5] = -60.0  # planted: flat (softplus' left tail) on every input

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x))).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functorch:
            return -torch.func.grad(self.energy)(x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.energy(x), x, create_graph=False)
        return -g


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g)]


def _check(model: Forces, report: deadneuron.Report, batches: list[torch.Tensor]) -> None:
    (site,) = report.sites.values()
    with torch.no_grad():
        z = torch.cat([model.fc(b) for b in batches]).numpy()
    a = torch.nn.functional.softplus(torch.from_numpy(z)).numpy()
    assert site.n == z.shape[0] == report.meta["samples"] == 11 and report.meta["batches"] == 2
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-5)
    np.testing.assert_allclose(site.channel_min, a.min(0), rtol=1e-6)
    np.testing.assert_allclose(site.channel_max, a.max(0), rtol=1e-6)
    assert 5 in site.dead_channels and len(site.dead_channels) == 1


def test_forces_by_torch_func_grad_are_measured_on_the_plain_tensor() -> None:
    torch.manual_seed(0)
    model, batches = Forces(functorch=True).eval(), _batches()
    with torch.no_grad():
        plain = [model(b) for b in batches]
    outputs: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, args, out: outputs.append(out))
    report = deadneuron.audit(model, batches, progress=False, rules=False)
    handle.remove()
    _check(model, report, batches)
    assert all(torch.equal(o, p) for o, p in zip(outputs, plain, strict=True))
    assert not report.meta["warnings"] and not any("no_grad" in n for n in report.meta.get("notes", []))


def test_forces_by_autograd_are_audited_under_no_grad_and_the_report_says_so() -> None:
    torch.manual_seed(0)
    model, batches = Forces(functorch=False).eval(), _batches()
    taken: list[int] = []

    def stream() -> Iterator[torch.Tensor]:  # a generator: each batch can be taken once
        for i, b in enumerate(batches):
            taken.append(i)
            yield b

    report = deadneuron.audit(model, stream(), progress=False, rules=False)
    _check(model, report, batches)
    assert taken == [0, 1]
    (note,) = [n for n in report.meta["notes"] if "torch.no_grad" in n]
    assert "gradients in its forward pass" in note
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # left as found


def test_a_forward_that_fails_for_another_reason_is_not_run_again() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(3, 4), nn.ReLU()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.act(self.fc(x)) @ torch.ones(5, 2)  # a shape error

    model = Broken().eval()
    try:
        deadneuron.audit(model, _batches(), progress=False, rules=False)
    except AuditRuntimeError as exc:
        assert "forward pass failed on batch 0" in str(exc)
    else:
        raise AssertionError("the broken forward was audited")
    assert model.calls == 1
