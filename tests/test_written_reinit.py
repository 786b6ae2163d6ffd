"""`deadneuron patch --reinit-dead` finds the layers around a site the audit names as written out (a GELU written
with torch.erf: ``fc>gelu``; ``h * torch.sigmoid(h)``: ``fc2>silu``), as it does around ``F.gelu``: before, those
sites were "not seen in the forward pass that maps layers to sites" and their fix was not suggested.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.patch.reinit import dataflow, reinit_dead


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2, self.out = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.bias[:10] = -30.0
            self.fc2.bias[:3] = -30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(gelu(self.fc(x)))
        return self.out(h * torch.sigmoid(h))


def test_dead_channels_of_written_sites_are_reinitialised_where_the_audit_names_them() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    report = deadneuron.audit(model, [x], progress=False)
    dead = {name: list(s.dead_channels) for name, s in report.sites.items()}
    assert dead == {"fc>gelu": list(range(10)), "fc2>silu": [0, 1, 2]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = reinit_dead(model, dead, dataflow(model, lambda m: m(x)))
    assert result.missing == []
    assert not torch.equal(model.fc.weight[:10], before["fc.weight"][:10])  # fresh incoming weights
    assert torch.equal(model.fc.weight[10:], before["fc.weight"][10:])
    # fc2: zero outgoing weights of fc>gelu's dead channels, then fresh rows for its own dead channels 0-2
    assert (model.fc2.weight[3:, :10] == 0).all() and torch.equal(model.fc2.weight[3:, 10:], before["fc2.weight"][3:, 10:])
    assert not torch.equal(model.fc2.weight[:3], before["fc2.weight"][:3])
    assert (model.out.weight[:, :3] == 0).all() and torch.equal(model.out.weight[:, 3:], before["out.weight"][:, 3:])


def test_a_gpt2_mlp_is_reinitialised_through_its_transposed_conv1d_layers() -> None:
    """Hugging Face's Conv1D stores its weight as (inputs, outputs): fresh columns in c_fc, zero rows in c_proj."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)).eval()
    mlp = model.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.bias[:5] = -40.0
    batch = {"input_ids": torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))}
    report = deadneuron.audit(model, [batch], progress=False)
    dead = list(report.sites["h.0.mlp.act"].dead_channels)
    assert dead == [0, 1, 2, 3, 4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = reinit_dead(model, {"h.0.mlp.act": dead}, dataflow(model, lambda m: m(**batch)))
    assert result.missing == []
    w, b = mlp.c_fc.weight, mlp.c_fc.bias
    assert not torch.equal(w[:, :5], before["h.0.mlp.c_fc.weight"][:, :5]) and (b[:5] == 0).all()  # its own init
    assert torch.equal(w[:, 5:], before["h.0.mlp.c_fc.weight"][:, 5:]) and torch.equal(b[5:], before["h.0.mlp.c_fc.bias"][5:])
    p = mlp.c_proj.weight
    assert (p[:5] == 0).all() and torch.equal(p[5:], before["h.0.mlp.c_proj.weight"][5:])
    assert {(s.param, s.dim) for s in result.slices} == {("h.0.mlp.c_fc.weight", 1), ("h.0.mlp.c_fc.bias", 0),
                                                         ("h.0.mlp.c_proj.weight", 0)}  # fmt: skip
