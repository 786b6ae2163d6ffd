"""Tensors researchers feed an audit: empty dims, dtypes no activation statistic is defined for, nested
tensors. Figures are checked against numpy over the tensors the model's own activation saw (a forward hook
of the test's, not deadneuron's); unsupported input gets one clear line and leaves the model as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.errors import AuditRuntimeError, UsageError


class Seen:
    """The (z, a) pairs an activation module saw, stored by a forward hook of the test's own."""

    def __init__(self, module: nn.Module) -> None:
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.pairs.append((args[0].detach().double().numpy().copy(), out.detach().double().numpy().copy()))

    def rows(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """z and a as (elements, channels)."""
        def flat(t: np.ndarray) -> np.ndarray:
            return np.moveaxis(t, axis % t.ndim, -1).reshape(-1, t.shape[axis % t.ndim])
        return (np.concatenate([flat(z) for z, _ in self.pairs]), np.concatenate([flat(a) for _, a in self.pairs]))


def _run_model(model: nn.Module, batches: list[torch.Tensor], act: nn.Module) -> Seen:
    seen = Seen(act)
    with torch.no_grad():
        for b in batches:
            model(b)
    seen.handle.remove()
    return seen


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_conv_batches_with_an_empty_batch_match_the_oracle() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    batches = [torch.randn(0, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(0, 3, 5, 5), torch.randn(1, 3, 2, 3)]
    z, a = _run_model(model, batches, model[1]).rows(1)
    for compile in (True, False):
        report = deadneuron.audit(model, batches, rules=False, compile=compile)
        site = report.sites["1"]
        assert site.n == z.shape[0] == 2 * 16 + 6
        np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), (a == 0).sum(0))
        np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), (z <= 0).sum(0))
        np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-6)
        assert report.meta["batches"] == 4 and report.meta["samples"] == 3


def test_a_site_with_no_channel_is_measured_as_empty_not_a_crash() -> None:
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(x[:, :0])  # a width-0 slice (a config with no extra features)

    model = Split().eval()
    report = deadneuron.audit(model, [torch.randn(4, 3)], rules=False)
    assert report.sites["relu"].channels == 0
    assert report.sites["relu"].dead_channels == ()
    assert _hooks(model) == [0, 0]


def test_complex_input_to_an_activation_module_is_named_not_called_unrecognised() -> None:
    model = nn.Sequential(nn.Linear(6, 5).to(torch.complex64), nn.Tanh()).eval()
    with pytest.raises(UsageError) as err:
        deadneuron.audit(model, [torch.randn(4, 6, dtype=torch.complex64)], rules=False)
    line = str(err.value)
    assert "'1'" in line and "complex64" in line and "\n" not in line
    assert "no recognised activation module" not in line  # there is one: Tanh, fed complex numbers
    assert _hooks(model) == [0, 0, 0]


def test_an_integer_site_beside_measured_ones_is_named_in_a_warning() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act, self.codes = nn.ReLU(), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x) + self.codes((x * 4).to(torch.int8)).float()

    model = Mixed().eval()
    x = torch.randn(5, 3)
    report = deadneuron.audit(model, [x], rules=False)
    assert list(report.sites) == ["act"]
    assert report.sites["act"].n == 5
    assert any("'codes'" in w and "int8" in w for w in report.meta["warnings"]), report.meta["warnings"]


def test_nested_jagged_input_is_one_usage_line_and_the_model_is_left_as_found() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    nt = torch.nested.nested_tensor([torch.randn(3, 6), torch.randn(5, 6)], layout=torch.jagged)
    with torch.no_grad():
        model(nt)  # the model itself runs on it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as err:
        deadneuron.audit(model, [nt], rules=False)
    line = str(err.value)
    assert "nested" in line and "'1'" in line and "to_padded_tensor" in line and "\n" not in line
    assert not isinstance(err.value, AuditRuntimeError)
    assert _hooks(model) == [0, 0, 0, 0] and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_eps_is_compared_as_given_not_rounded_to_the_activation_dtype(dtype: torch.dtype) -> None:
    """float32(1e-30) is above 1e-30 (and float16(1e-3) above 1e-3): an activation equal to it is not within eps."""
    eps = 1e-30 if dtype != torch.float16 else 1e-3
    model = nn.Sequential(nn.ReLU(), nn.Tanh()).eval()  # the one-read ReLU and a two-tensor site
    x = torch.tensor([[0.0, eps, 2 * eps, -eps]], dtype=torch.float32).to(dtype)
    for compile in (True, False):
        report = deadneuron.audit(model, [x], rules=False, eps=eps, compile=compile)
        a = torch.relu(x).double().numpy()
        np.testing.assert_array_equal(np.array(report.sites["0"].channel_zero), (np.abs(a) <= eps).sum(0))
        t = torch.tanh(torch.relu(x)).double().numpy()
        np.testing.assert_array_equal(np.array(report.sites["1"].channel_zero), (np.abs(t) <= eps).sum(0))
