"""The functional probe on every batch: sites that first run on a later batch (control flow that depends
on the input) are found and traced as on the first, and the probe leaves no mode or hook behind.

Figures are checked against the numpy oracle over the tensors the model stored itself (tests/zoo.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import AuditRuntimeError, UsageError
from tests import zoo


def _mode_stack() -> list[object]:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def plant(layer: nn.Module, channels: Sequence[int]) -> None:
    with torch.no_grad():
        for c in channels:
            layer.weight[c] = 0.0
            layer.bias[c] = -100.0


class BranchOnLength(nn.Module):
    """Conv1d (N, 6, L) into F.relu; on inputs longer than 8 only, that output shifted into torch.tanh;
    and one F.relu per 4 positions of a slice of it (a loop whose count depends on the length). Channels
    are dim 1 throughout and L differs from 6, so a guessed axis (the last dim) would read other
    channels: the sites that first run on a later batch are right only if the ops are traced there."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        plant(self.conv, [2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        self.tap.pre("conv>relu", z, 1)
        h = self.tap.post("conv>relu", F.relu(z))
        if x.shape[-1] > 8:
            z2 = h * 2.0 - 3.0  # the planted channel: -3 everywhere, flat for tanh
            self.tap.pre("tanh", z2, 1)
            self.tap.post("tanh", torch.tanh(z2))
        for k in range(x.shape[-1] // 4):
            zk = h[:, :, 4 * k : 4 * k + 4] - 0.5
            self.tap.pre(f"relu#{k}", zk, 1)
            self.tap.post(f"relu#{k}", F.relu(zk))
        return h


LENGTHS = (5, 12, 7, 16)  # tanh first runs on the second batch, relu#1 and #2 there, relu#3 on the fourth


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 3, n, generator=g) for n in LENGTHS]


def _audit_branching() -> tuple[deadneuron.Report, zoo.Tap]:
    torch.manual_seed(0)
    tap = zoo.Tap()
    model = BranchOnLength(tap).eval()
    batches = _batches()
    tap.on = True
    with torch.no_grad():
        for b in batches:
            model(b)
    tap.on = False
    return deadneuron.audit(model, batches, progress=False), tap


def test_sites_that_first_run_on_a_later_batch_are_traced_and_match_the_oracle() -> None:
    report, tap = _audit_branching()
    assert list(report.sites) == ["conv>relu", "relu#0", "tanh", "relu#1", "relu#2", "relu#3"]
    calls = {"conv>relu": 4, "relu#0": 4, "tanh": 2, "relu#1": 2, "relu#2": 2, "relu#3": 1}
    for name, site in report.sites.items():
        kind = "tanh" if name == "tanh" else "relu"
        want = zoo.oracle(tap, name, kind)
        assert site.calls == calls[name], name
        assert (site.channel_axis, site.axis_source) == (1, "producer" if name == "conv>relu" else "traced"), name
        assert site.channels == 6 and site.n == want.n, name
        np.testing.assert_array_equal(np.rint(np.array(site.channel_zero) * site.n), want.zero, err_msg=name)
        flat = np.rint(np.array(site.channel_flat) * site.n)
        if kind == "relu":
            np.testing.assert_array_equal(flat, want.flat, err_msg=name)
        else:  # tanh's threshold is derived on a grid: elements next to it may fall either side
            assert np.abs(flat - want.flat).max() <= max(2, 0.01 * want.n), name
        assert list(site.dead_channels) == want.dead and 2 in want.dead, name
    assert not [w for w in report.meta["warnings"] if "guess" in w]


def test_the_same_batches_in_another_order_give_the_same_figures() -> None:
    """A site's figures do not depend on the batch it first ran on (traced there, not carried over)."""
    report, _ = _audit_branching()
    torch.manual_seed(0)
    model = BranchOnLength(zoo.Tap()).eval()
    again = deadneuron.audit(model, _batches()[::-1], progress=False)
    assert sorted(again.sites) == sorted(report.sites)
    for name, site in report.sites.items():
        other = again.sites[name]
        assert (other.channel_axis, other.axis_source, other.calls, other.n) == (
            site.channel_axis, site.axis_source, site.calls, site.n), name  # fmt: skip
        np.testing.assert_array_equal(other.channel_flat, site.channel_flat, err_msg=name)
        np.testing.assert_allclose(other.channel_mean, site.channel_mean, rtol=1e-6, err_msg=name)  # summing order


class GrowsChannels(nn.Module):
    """F.relu on the input's last dim, with no layer to fix the axis: a guessed axis whose size changes
    on the second batch is a usage error raised inside the probe's handler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x - 0.5)


def test_an_error_raised_inside_the_probe_leaves_no_mode_and_no_hook() -> None:
    model = nn.Sequential(GrowsChannels()).eval()
    with pytest.raises(UsageError, match="channel axis"):
        deadneuron.audit(model, [torch.randn(2, 3, 4), torch.randn(2, 3, 5)], progress=False)
    assert _mode_stack() == []
    assert _hooks(model) == 0


class RaisesAfterAnActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.lin(x))
        return h @ torch.ones(3, 3)  # shape error after a measured site


def test_a_forward_that_raises_after_a_site_leaves_no_mode_and_no_hook() -> None:
    model = RaisesAfterAnActivation().eval()
    with pytest.raises(AuditRuntimeError, match="lin>gelu"):
        deadneuron.audit(model, [torch.randn(2, 4)], progress=False)
    assert _mode_stack() == []
    assert _hooks(model) == 0


def test_a_users_mode_inside_the_forward_sees_its_calls_and_is_popped_by_the_model() -> None:
    """A mode the model pushes and pops itself, above the probe: the activation under it is still a
    site (the user's mode hands the call down), and both stacks are as the model left them."""
    seen: list[str] = []

    class Counting(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    class UsesAMode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with Counting():
                return torch.tanh(self.lin(x))

    report = deadneuron.audit(UsesAMode().eval(), [torch.randn(3, 4)], progress=False)
    assert list(report.sites) == ["lin>tanh"] and report.sites["lin>tanh"].channels == 5
    assert "tanh" in seen
    assert _mode_stack() == []


def test_a_torch_function_declared_after_a_first_audit_is_found_in_the_next() -> None:
    class TwoLinears(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.erf(self.lin(x))

    model, batches = TwoLinears().eval(), [torch.randn(5, 4)]
    with pytest.raises(UsageError):  # erf is no activation kind: nothing to measure
        deadneuron.audit(model, batches, progress=False)
    with deadneuron.register_activation(torch.erf, torch.erf):
        report = deadneuron.audit(model, batches, progress=False)
        assert list(report.sites) == ["lin>erf"] and report.sites["lin>erf"].channels == 6
    with pytest.raises(UsageError):  # and gone again once the declaration is removed
        deadneuron.audit(model, batches, progress=False)


def test_an_unhashable_callable_passes_through_the_probe() -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    class CallsIt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            h = torch.overrides.handle_torch_function(Unhashable(), (h,), h)
            return F.relu(h)

    report = deadneuron.audit(CallsIt().eval(), [torch.randn(2, 4)], progress=False)
    assert list(report.sites) == ["relu"] and report.sites["relu"].channels == 4
    assert _mode_stack() == []
