"""``x * torch.sigmoid(x)`` (swish, as the DDPM, LDM and VQGAN UNets write their ``nonlinearity``) is SiLU: flat
only where x is very negative, linear where x is large. Measured as the sigmoid it calls, a channel whose input
stays high read dead. The oracle: numpy over the pre-activations the test's own hooks stored, with SiLU's and
the sigmoid's flat tails found on a grid by numpy (|f'| <= 0.05 max |f'|), not by deadneuron.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.probe.recorder import Recorder

DELTA = 0.05
GRID = np.linspace(-40, 40, 800001)


def _sig(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _flat(deriv: np.ndarray) -> np.ndarray:
    return np.abs(deriv) <= DELTA * np.abs(deriv).max()


def _swish_tail(beta: float) -> float:
    """The last flat point of the left tail of x * sigmoid(beta * x)."""
    s = _sig(beta * GRID)
    return float(GRID[np.argmin(_flat(s + beta * GRID * s * (1 - s)))] - (GRID[1] - GRID[0]))


S = _sig(GRID)
SIG_FLAT = _flat(S * (1 - S))
SIG_LO, SIG_HI = GRID[np.argmin(SIG_FLAT)] - (GRID[1] - GRID[0]), GRID[::-1][np.argmin(SIG_FLAT[::-1])]

FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "x * torch.sigmoid(x)": lambda x: x * torch.sigmoid(x),
    "torch.sigmoid(x) * x": lambda x: torch.sigmoid(x) * x,
    "x * x.sigmoid()": lambda x: x * x.sigmoid(),
    "torch.mul(x, x.sigmoid())": lambda x: torch.mul(x, x.sigmoid()),
    "x.mul_(x.sigmoid())": lambda x: x.mul_(x.sigmoid()),  # timm's in-place swish
    "x * torch.sigmoid(1.702 * x)": lambda x: x * torch.sigmoid(1.702 * x),  # QuickGELU, as CLIP writes it
    "torch.sigmoid(x * 2.0) * x": lambda x: torch.sigmoid(x * 2.0) * x,
}
BETA = {"x * torch.sigmoid(1.702 * x)": 1.702, "torch.sigmoid(x * 2.0) * x": 2.0}
DEAD, HIGH = 2, 5  # channels planted below SiLU's flat tail and far above the sigmoid's upper one


class Block(nn.Module):
    """A VQGAN-style residual block: GroupNorm then the swish, twice."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], c: int = 8) -> None:
        super().__init__()
        self.act = act
        self.norm1, self.conv1 = nn.GroupNorm(2, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(2, c), nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.bias[DEAD], norm.bias[HIGH] = -50.0, 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


def _stored(model: Block, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The swish inputs (the norms' outputs), stored by the test's own hooks: (elements, channels) per norm."""
    kept: dict[str, list[np.ndarray]] = {"norm1": [], "norm2": []}
    handles = [getattr(model, n).register_forward_hook(
        lambda m, a, o, n=n: kept[n].append(o.detach().double().permute(0, 2, 3, 1).reshape(-1, o.shape[1]).numpy()))
        for n in kept]  # fmt: skip
    with torch.no_grad():
        for b in batches:
            model(b.clone())
    for h in handles:
        h.remove()
    return {n: np.concatenate(v) for n, v in kept.items() if v}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, 6, 6, generator=g) for _ in range(3)]


@pytest.mark.parametrize("form", list(FORMS))
def test_a_written_swish_is_measured_as_silu(form: str) -> None:
    torch.manual_seed(0)
    model, batches = Block(FORMS[form]).eval(), _batches()
    stored = _stored(model, batches)
    report = deadneuron.audit(model, batches, progress=False)
    beta = BETA.get(form, 1.0)
    leaf, kind = ("silu", "silu") if beta == 1 else ("swish", f"x*sigmoid({beta:g}x)")
    assert list(report.sites) == [f"norm1>{leaf}", f"norm2>{leaf}"]
    for norm, z in stored.items():
        s = report.sites[f"{norm}>{leaf}"]
        assert s.kind == kind and s.channel_axis == 1 and (beta != 1 or "x*sigmoid(x)" in s.label)
        flat = (z <= _swish_tail(beta)) & np.isfinite(z)
        assert np.allclose(s.channel_flat, flat.mean(0), atol=0, rtol=0)
        assert list(s.dead_channels) == [DEAD] == list(np.flatnonzero(flat.all(0)))  # the high channel is alive
        a = z * _sig(beta * z)
        assert s.mean == pytest.approx(a.mean(), rel=1e-5) and s.channel_max == pytest.approx(a.max(0), rel=1e-5)
        assert s.n == z.shape[0] and s.calls == len(batches)


@pytest.mark.parametrize("form", ["gate", "sigmoid, then a module", "sigmoid last"])
def test_a_sigmoid_not_multiplied_by_its_input_stays_a_sigmoid(form: str) -> None:
    """A gate (x times the sigmoid of another tensor), a sigmoid fed to a module, one the forward returns:
    the sigmoid's own region, both tails, on the sigmoid's own input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 1)
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gate": lambda x: x.flip(0) * torch.sigmoid(x), "sigmoid, then a module": lambda x: conv(torch.sigmoid(x)),
        "sigmoid last": torch.sigmoid}  # fmt: skip
    model, batches = Block(acts[form]).eval(), _batches()
    model.conv = conv
    if form == "sigmoid last":
        model.forward = lambda x: model.act(model.norm1(x))  # type: ignore[method-assign]
    stored = _stored(model, batches)
    report = deadneuron.audit(model, batches, progress=False)
    assert len(report.sites) == len(stored)
    for norm in stored:
        s, z = report.sites[f"{norm}>sigmoid"], stored[norm]
        assert s.kind == "sigmoid" and s.calls == len(batches)
        flat = ((z <= SIG_LO) | (z >= SIG_HI)) & np.isfinite(z)
        assert np.allclose(s.channel_flat, flat.mean(0), atol=0, rtol=0)
        assert list(s.dead_channels) == [DEAD, HIGH] == list(np.flatnonzero(flat.all(0)))
        assert s.mean == pytest.approx(_sig(z).mean(), rel=1e-5)


def test_the_model_computes_what_it_computes_without_the_recorder() -> None:
    torch.manual_seed(0)
    for form in FORMS.values():
        model, x = Block(form).eval(), _batches()[0]
        with torch.no_grad():
            plain = model(x.clone())
            with Recorder(model) as rec:
                rec.start_batch()
                seen = model(x.clone())
        assert torch.equal(plain, seen) and len(rec.results()) == 2
