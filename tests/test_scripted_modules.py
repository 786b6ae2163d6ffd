"""A TorchScript submodule takes no forward hooks: the audit measures the rest of the model, names the
scripted part in a warning (its activations are not measured, never silently), and leaves the model as
it found it. A model that is all TorchScript measures nothing: a usage error, so no gate passes on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.errors import UsageError


def _stored(model: nn.Module, batches: list[torch.Tensor], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each named Python module's outputs over ``batches``, stored by hooks of the test's own, as (rows, C)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda _m, _a, o, name=name: out[name].append(o.detach().numpy()))
               for name in names]  # fmt: skip
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {name: np.concatenate(v) for name, v in out.items()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), torch.jit.script(nn.Sequential(nn.Linear(6, 5), nn.ReLU())),
                          nn.Linear(5, 3), nn.Tanh())  # fmt: skip
    with torch.no_grad():
        model[0].bias[2] = -50.0  # channel 2 of the first ReLU: dead
    return model


def test_a_scripted_submodule_is_named_and_the_rest_is_measured() -> None:
    model = _model()
    batches = [3 * torch.randn(8, 4) for _ in range(2)]
    want = _stored(model, batches, ("1", "4"))
    report = deadneuron.audit(model, batches, rules=False)
    assert sorted(report.sites) == ["1", "4"]
    relu, tanh = report.sites["1"], report.sites["4"]
    assert relu.dead_channels == tuple(np.flatnonzero((want["1"] == 0).all(0)).tolist()) == (2,)
    np.testing.assert_allclose(relu.channel_zero, (want["1"] == 0).mean(0))
    np.testing.assert_allclose(tanh.channel_mean, want["4"].astype(np.float64).mean(0), rtol=1e-6)
    warning = [w for w in report.warnings if "TorchScript" in w]  # the scripted module, not each module in it
    assert len(warning) == 1 and "'2'" in warning[0] and "ReLU '2.1'" in warning[0], report.warnings
    assert "not measured" in warning[0]


def test_a_scripted_submodule_leaves_the_model_as_found() -> None:
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deadneuron.audit(model, [torch.randn(3, 4)], rules=True)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
               if not isinstance(m, torch.jit.ScriptModule))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_is_all_torchscript_is_a_usage_error_naming_it() -> None:
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 5), nn.ReLU()))
    with pytest.raises(UsageError, match="TorchScript"):
        deadneuron.audit(model, [torch.randn(3, 4)], rules=False)
