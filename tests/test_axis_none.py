"""An activation whose input has no channel dim is one channel over all its elements (`AxisSource.NONE`).

A binary classifier's ``torch.sigmoid(self.fc(x).squeeze(-1))``, a per-token gate ``sigmoid((h * w).sum(-1))``,
one feature taken with ``x[..., 0]``: the channel dim was squeezed, reduced or indexed away. Read on its last
dim, as a 1-D or 2-D tensor of unknown origin is, such a site counted samples or tokens as channels (5
"channels" of one element each), and a smaller last batch stopped the audit with advice no axis could
satisfy. Oracle: the pre-activations the model stored itself, pooled whole by numpy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app


class Head(nn.Module):
    """A ReLU MLP body, then one feature per sample (or per token) from ``form``; its ReLU stores z."""

    def __init__(self, form: str, dead: bool = False) -> None:
        super().__init__()
        self.form = form
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 1 if form in ("squeeze", "view(-1)", "[:, 0]") else 3)
        self.w = nn.Parameter(torch.randn(8))
        if dead:
            with torch.no_grad():
                self.fc.bias.fill_(-100.0)
                self.w.zero_()
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        z = {
            "squeeze": lambda: self.fc(h).squeeze(-1),  # (N,)
            "view(-1)": lambda: self.fc(h).view(-1),
            "[:, 0]": lambda: self.fc(h)[:, 0],
            "[..., 1] of 3": lambda: self.fc(h)[..., 1],  # one of three features: (N,) or (N, L)
            "sum(-1)": lambda: (h * self.w).sum(-1) - 100.0 * (self.fc.bias[0] < -50),
            "unbind": lambda: self.fc(h).unbind(-1)[2],
            "norm then scale": lambda: 0.5 * torch.linalg.vector_norm(h, dim=-1) + self.fc.bias[0],
        }[self.form]()
        self.seen.append(z.detach().numpy().copy())
        return F.relu(z)


FORMS = ["squeeze", "view(-1)", "[:, 0]", "[..., 1] of 3", "sum(-1)", "unbind", "norm then scale"]


def _rerun(model: Any, batches: list[torch.Tensor]) -> list[np.ndarray]:
    """The pre-activations ``model`` stores (its ``seen``) over ``batches``, run again outside the audit."""
    model.seen.clear()
    with torch.no_grad():
        for b in batches:
            model(b)
    return list(model.seen)


def _stored(model: Head, batches: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([z.reshape(-1) for z in _rerun(model, batches)]).astype(np.float64)


# on (N, L, 1) tokens, [:, 0] takes the first token: its one channel stays, (N, 1)
CASES = [(form, tokens) for tokens in (False, True) for form in FORMS if not (tokens and form == "[:, 0]")]


@pytest.mark.parametrize(("form", "tokens"), CASES, ids=[f"{f}-{'tokens' if t else 'samples'}" for f, t in CASES])
def test_no_channel_dim_is_one_channel_over_every_element(form: str, tokens: bool) -> None:
    torch.manual_seed(0)
    model = Head(form).eval()
    sizes = [5, 5, 3]  # a smaller last batch: a per-sample "channel" count would change
    batches = [torch.randn(n, 4, 6) if tokens else torch.randn(n, 6) for n in sizes]
    report = deadneuron.audit(model, batches, progress=False)
    z = _stored(model, batches)
    site = report.sites["relu"]
    assert (site.channels, site.axis_source) == (1, "none")
    assert site.n == z.size == sum(sizes) * (4 if tokens else 1)
    assert site.channel_zero[0] == pytest.approx((z <= 0).mean(), abs=1e-12)
    assert site.channel_flat[0] == pytest.approx((z <= 0).mean(), abs=1e-12)
    assert site.channel_mean[0] == pytest.approx(np.maximum(z, 0).mean(), rel=1e-9)
    assert list(site.dead_channels) == []


@pytest.mark.parametrize("form", ["squeeze", "sum(-1)"])
def test_a_dead_single_channel_is_found(form: str) -> None:
    torch.manual_seed(0)
    model = Head(form, dead=True).eval()
    batches = [torch.randn(4, 6), torch.randn(2, 6)]
    report = deadneuron.audit(model, batches, progress=False)
    assert (_stored(model, batches) <= 0).all()
    site = report.sites["relu"]
    assert (site.channels, list(site.dead_channels)) == (1, [0])


def test_padding_is_left_out_of_a_per_token_gate() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.w = nn.Embedding(30, 8), nn.Parameter(torch.randn(8))
            self.seen: list[torch.Tensor] = []

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            z = (self.emb(input_ids) * self.w).sum(-1)  # (N, L): one score per token
            self.seen.append(z.detach())
            return torch.relu(z)

    torch.manual_seed(0)
    model = Gate().eval()
    ids = torch.randint(1, 30, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    report = deadneuron.audit(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    with torch.no_grad():
        model(ids, mask)
    z = model.seen[-1].numpy()[mask.bool().numpy()].astype(np.float64)
    site = report.sites["relu"]
    assert (site.channels, site.axis_source, site.n) == (1, "none", z.size == 4 + 7 + 1 and z.size)
    assert site.channel_zero[0] == pytest.approx((z <= 0).mean(), abs=1e-12)


class PooledMap(nn.Module):
    """A conv map averaged over its width: (N, C, H), channels still at dim 1 (H == C, so no guess can tell)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.bias[4] = -100.0
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).mean(-1)
        self.seen.append(z.detach().numpy().copy())
        return F.relu(z)


def test_a_reduction_over_other_dims_keeps_the_channel_axis() -> None:
    torch.manual_seed(0)
    model = PooledMap().eval()
    batches = [torch.randn(3, 2, 6, 5) for _ in range(2)]
    report = deadneuron.audit(model, batches, progress=False)
    z = np.moveaxis(np.concatenate(_rerun(model, batches)), 1, -1).reshape(-1, 6)
    site = report.sites["relu"]
    assert (site.channel_axis, site.axis_source, site.channels) == (1, "traced", 6)
    assert list(site.dead_channels) == [c for c in range(6) if (z[:, c] <= 0).all()] == [4]


def test_the_monitor_reads_the_gradient_of_a_single_channel() -> None:
    torch.manual_seed(0)
    model = Head("squeeze")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 6)
    with deadneuron.Monitor(model, every=1, optimizer=opt) as mon:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        mon.step()
    z = torch.tensor(model.seen[-1])
    (snap,) = mon.snapshots
    site = snap.sites["relu"]
    assert site.channels == 1 and site.grad_elements == 8
    assert site.grad_nonzero == pytest.approx((z > 0).double().mean().item())  # d relu(z).sum() / dz = [z > 0]


class RawScores(nn.Module):
    """A ReLU on the model's own 1-D input, (N,) scores: no layer says what its one dim is."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.scale * x - 1.0)


def test_the_user_can_say_an_input_has_no_channel_dim() -> None:
    batches = [torch.randn(6), torch.randn(6)]
    z = np.concatenate([(2.0 * b - 1.0).numpy() for b in batches]).astype(np.float64)
    read = deadneuron.audit(RawScores().eval(), batches, progress=False).sites["relu"]
    assert (read.channels, read.axis_source) == (6, "rank")  # read on its one dim: six "channels", as stated
    site = deadneuron.audit(RawScores().eval(), batches, progress=False, channel_axis={"relu": None}).sites["relu"]
    assert (site.channels, site.axis_source, site.n) == (1, "none", 12)
    assert site.channel_zero[0] == pytest.approx((z <= 0).mean(), abs=1e-12)


def test_cli_channel_axis_none(tmp_path: Path) -> None:
    source = tmp_path / "scores.py"
    source.write_text(
        "import torch\nfrom tests.test_axis_none import RawScores\n\n"
        "def build():\n    return RawScores()\n\n"
        "def batches():\n    g = torch.Generator().manual_seed(0)\n    return [torch.randn(5, generator=g), torch.randn(3, generator=g)]\n"
    )
    torch.save(RawScores().state_dict(), weights := tmp_path / "scores.pth")
    common = ["audit", str(weights), "--model", f"{source}:build", "--data", f"{source}:batches", "--no-rules",
              "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(app, [*common, "--channel-axis", "relu=none"])
    assert result.exit_code == 0, result.stderr
    (site,) = json.loads(result.stdout)["sites"]
    assert (site["channels"], site["axis_source"], site["n"]) == (1, "none", 8)
    wrong = CliRunner().invoke(app, [*common, "--channel-axis", "relu=nothing"])
    assert wrong.exit_code == 2 and "or none where the input has no channel dim" in wrong.stderr


class HandNorm(nn.Module):
    """A linear layer, an RMS norm and a layer norm written as tensor ops, then a ReLU: the norms' statistics
    (reduced over the channel dim, keepdim) broadcast back and the channel axis stays the linear's. Tokens
    as many as channels, so that only a derived axis reads them right; channels 2 and 5 planted dead."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.b = nn.Parameter(torch.zeros(8))
        with torch.no_grad():
            self.b[[2, 5]] = -100.0
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h - h.mean(dim=-1, keepdim=True)) / h.std(-1, keepdim=True) + self.b
        self.seen.append(h.detach().numpy().copy())
        return F.relu(h)


def test_a_norm_written_as_tensor_ops_keeps_the_channel_axis() -> None:
    torch.manual_seed(0)
    model = HandNorm().eval()
    batches = [torch.randn(3, 8, 4) for _ in range(2)]
    report = deadneuron.audit(model, batches, progress=False)
    z = np.concatenate(_rerun(model, batches)).reshape(-1, 8)
    site = report.sites["relu"]
    assert (site.channel_axis, site.axis_source, site.channels) == (2, "traced", 8)
    assert list(site.dead_channels) == [c for c in range(8) if (z[:, c] <= 0).all()] == [2, 5]
