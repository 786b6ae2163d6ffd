"""A mixture of experts that keeps its experts' weights stacked in one parameter runs every routed row through
one activation call: each channel there is the same neuron index of every expert, pooled. The audit cannot tell
the rows' experts apart, so it names such a site; experts kept as modules of their own are sites of their own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron


class StackedMoE(nn.Module):
    """Top-1 routing over experts stacked in (E, hidden, dim) parameters, run as one batched product."""

    def __init__(self, dim: int = 8, hidden: int = 12, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = self.router(x).argmax(-1)
        h = F.relu(torch.bmm(self.w1[expert], x.unsqueeze(-1)).squeeze(-1))
        return torch.bmm(self.w2[expert], h.unsqueeze(-1)).squeeze(-1)


class ModuleMoE(nn.Module):
    """The same routing, each expert a module of its own."""

    def __init__(self, dim: int = 8, hidden: int = 12, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, e in enumerate(self.experts):
            rows = expert == i
            out[rows] = e(x[rows])
        return out


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 8, generator=g) for _ in range(2)]


def test_a_site_of_stacked_expert_weights_is_named_with_what_it_pools() -> None:
    torch.manual_seed(0)
    model, batches = StackedMoE().eval(), _batches()
    with torch.no_grad():  # expert 0's neuron 4 never fires; the others' neuron 4 does
        model.w1[0, 4] = 0.0
        h = [F.relu(torch.bmm(model.w1[model.router(x).argmax(-1)], x.unsqueeze(-1)).squeeze(-1)).numpy() for x in batches]
    z = np.concatenate(h)
    report = deadneuron.audit(model, batches, progress=False)
    (s,) = report.sites.values()
    assert s.channels == 12 and s.n == z.shape[0]
    assert list(s.dead_channels) == list(np.flatnonzero((z <= 0).all(0))) and 4 not in s.dead_channels  # pooled
    (warning,) = [w for w in report.meta["warnings"] if "stack of per-expert weights" in w]
    assert f"site {s.name!r}" in warning and "w1 3 x 12 x 8" in warning and "dead in every expert" in warning


def test_experts_as_modules_are_sites_of_their_own_and_not_named() -> None:
    torch.manual_seed(0)
    report = deadneuron.audit(ModuleMoE().eval(), _batches(), progress=False)
    assert len(report.sites) == 3
    assert not [w for w in report.meta["warnings"] if "per-expert" in w]


def test_a_convolution_kernel_is_no_stack_of_experts() -> None:
    model = nn.Sequential(nn.Conv1d(4, 12, 3), nn.ReLU(), nn.Conv1d(12, 12, 1), nn.ReLU()).eval()
    report = deadneuron.audit(model, [torch.randn(5, 4, 16)], progress=False)
    assert len(report.sites) == 2 and not [w for w in report.meta["warnings"] if "per-expert" in w]


def test_a_hugging_face_mixtral_is_named() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=40, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralModel(cfg).eval()
    report = deadneuron.audit(model, [{"input_ids": torch.randint(0, 64, (2, 7))}], progress=False)
    (site,) = [n for n in report.sites if ".experts." in n]
    assert [w for w in report.meta["warnings"] if f"site {site!r}" in w and "gate_up_proj 4 x 80 x 32" in w]
