"""An activation written as one expression of torch calls (GELU with ``torch.erf`` or ``torch.tanh``, Mish with
``F.softplus``) is measured as that expression: its input the variable it is written of, its output the
expression, its flat region the expression's. Measured as the tanh inside, a channel far out on GELU's linear side
read saturated; the erf was no site at all. The oracle: numpy over the layer outputs the test's own hook stored,
each function written again in numpy and its flat tail found from numpy's finite differences on a grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

DELTA = 0.05
GRID = np.linspace(-40, 40, 1600001)
ERF = np.vectorize(math.erf)
SQRT2 = math.sqrt(2.0)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


NUMPY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": lambda x: 0.5 * x * (1 + ERF(x / SQRT2)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "lecun": lambda x: 1.7159 * np.tanh(x * 2 / 3) + 0.1 * x,
}


def _flat_set(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Where |f'| <= DELTA max |f'| (np.gradient on a fine grid), as a test on values."""
    d = np.abs(np.gradient(f(GRID), GRID))
    small = d <= DELTA * d.max()
    if small.all() or not small.any():
        return lambda z: np.full(z.shape, bool(small.all()))
    lo = GRID[np.argmin(small) - 1] if small[0] else -np.inf  # the left tail only, for these functions
    assert small[0] or not small.any()
    return lambda z: z <= lo


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # BERT's reference code


def gelu_erf_constant(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.special.erf(x / SQRT2))


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))  # GPT-2's


def mish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(F.softplus(x))


def mish_methods(x: torch.Tensor) -> torch.Tensor:
    return x * F.softplus(x).tanh()


def lecun(x: torch.Tensor) -> torch.Tensor:
    return 1.7159 * torch.tanh(x * 2 / 3) + 0.1 * x  # a scaled tanh with a leak: flat nowhere


class NewGELU(nn.Module):
    """minGPT's, written in the module's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# written form -> (numpy function, site leaf, kind, label part)
CASES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str, str, str]] = {
    "gelu_erf": (gelu_erf, "gelu", "gelu", "approximate=none"),
    "gelu_erf_constant": (gelu_erf_constant, "gelu", "gelu", "approximate=none"),
    "new_gelu": (new_gelu, "gelu_tanh", "gelu", "approximate=tanh"),
    "NewGELU": (NewGELU(), "gelu_tanh", "gelu", "approximate=tanh"),
    "mish": (mish, "mish", "mish", "written=x * torch.tanh(F.softplus(x))"),
    "mish_methods": (mish_methods, "mish", "mish", "written=x * F.softplus(x).tanh()"),
    "lecun": (lecun, "lecun", "lecun", "lecun"),
}
DEAD, HIGH = 3, 5


class Net(nn.Module):
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 16), act, nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[DEAD], self.fc.bias[HIGH] = -60.0, 60.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("form", list(CASES))
def test_an_activation_written_as_one_expression_is_measured_as_it(form: str) -> None:
    act, numpy_name, kind, label = CASES[form]
    torch.manual_seed(0)
    model, batches = Net(act).eval(), _batches()
    kept: list[np.ndarray] = []
    hook = model.fc.register_forward_hook(lambda m, a, o: kept.append(o.detach().double().numpy().copy()))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    z = np.concatenate(kept)
    report = deadneuron.audit(model, batches, progress=False)
    name = f"fc>{'lecun' if form == 'lecun' else kind}"
    assert list(report.sites) == [name], list(report.sites)
    s = report.sites[name]
    assert s.kind == kind and label in s.label and s.channel_axis in (-1, 1) and s.calls == len(batches)
    flat = _flat_set(NUMPY[numpy_name])(z)
    assert np.array_equal(np.asarray(s.channel_flat), flat.mean(0))
    assert list(s.dead_channels) == list(np.flatnonzero(flat.all(0))) == ([] if form == "lecun" else [DEAD])
    a = NUMPY[numpy_name](z)
    assert s.mean == pytest.approx(a.mean(), rel=1e-5) and s.channel_max == pytest.approx(a.max(0), rel=1e-5)


def gate(x: torch.Tensor) -> torch.Tensor:
    h = x.flip(0)
    return h * torch.tanh(x)  # two variables: a gate, not an activation of x written out


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.tanh(x)  # reads the module: not taken


@pytest.mark.parametrize("act", [torch.tanh, gate, Scaled()], ids=["tanh alone", "gate", "module attribute"])
def test_a_tanh_not_inside_such_an_expression_is_measured_alone(act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    report = deadneuron.audit(Net(act).eval(), _batches(), progress=False)
    (s,) = report.sites.values()
    assert s.kind == "tanh" and list(s.dead_channels) == [DEAD, HIGH]  # both of tanh's tails are flat


def test_without_the_source_the_call_is_measured_alone() -> None:
    namespace: dict[str, object] = {"torch": torch, "math": math}
    exec(compile("def hidden_gelu(x):\n    return 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.044715 * x ** 3)))\n",
                 "<no file>", "exec"), namespace)  # fmt: skip
    report = deadneuron.audit(Net(namespace["hidden_gelu"]).eval(), _batches(), progress=False)  # type: ignore[arg-type]
    (s,) = report.sites.values()
    assert s.kind == "tanh"


def test_training_under_the_monitor_is_unchanged() -> None:
    torch.manual_seed(0)
    plain = Net(new_gelu)
    watched = copy.deepcopy(plain)

    def train(model: nn.Module, mon: deadneuron.Monitor | None) -> list[torch.Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x in _batches():
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step()
        return [p.detach().clone() for p in model.parameters()]

    before = train(plain, None)
    with deadneuron.Monitor(watched, every=1) as mon:
        after = train(watched, mon)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert set(mon.timeline["site"]) == {"fc>gelu"} and (mon.timeline["dead"] == 1).all()
    assert (mon.timeline["grad_elements"] > 0).all()  # the gradient followed on the expression's own output
