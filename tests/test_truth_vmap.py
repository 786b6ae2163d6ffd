"""Truth for activations computed inside ``torch.func.vmap``: a function mapped over the batch's examples, vmap
nested, and an ensemble of models stacked with ``torch.func.stack_module_state``. An activation's input there is
a batched tensor without storage: the audit stopped with "Cannot access data pointer of Tensor that doesn't have
storage" (a module) or a refused ``requires_grad_`` (a functional GELU, whose flat region is derived on first
use). Now the plain tensor of every mapped example is measured, the channel axis decided on the logical tensor,
and the report names each such site and what its figures pool.

The oracle is numpy over the pre-activations the test computes itself with the same layers, without vmap.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from tests.test_truth_archs6 import flat_bounds


def _oracle(z: np.ndarray, a: np.ndarray, kind: str) -> dict[str, np.ndarray | int]:
    """Per channel (last dim) over every row: what the site must report."""
    z, a = z.reshape(-1, z.shape[-1]), a.reshape(-1, a.shape[-1])
    lo, hi = flat_bounds(kind, z)
    return {"n": z.shape[0], "zero": (a == 0).sum(0), "flat_lo": lo, "flat_hi": hi, "mean": a.mean(0),
            "min": a.min(0), "max": a.max(0)}  # fmt: skip


def _check(site: deadneuron.SiteHealth, want: dict[str, np.ndarray | int]) -> None:
    n = site.n
    assert n == want["n"], (site.name, n, want["n"])
    np.testing.assert_array_equal(np.rint(np.asarray(site.channel_zero) * n), want["zero"])
    flat = np.rint(np.asarray(site.channel_flat) * n)
    assert ((want["flat_lo"] <= flat) & (flat <= want["flat_hi"])).all(), site.name
    np.testing.assert_allclose(site.channel_mean, want["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(site.channel_min, want["min"], rtol=1e-6)
    np.testing.assert_allclose(site.channel_max, want["max"], rtol=1e-6)


class PerExample(nn.Module):
    """A per-example function mapped over the batch: Linear + nn.ReLU, Linear + F.gelu, a conv map + nn.SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(8, 16), nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.conv, self.silu = nn.Conv2d(3, 5, 3), nn.SiLU()
        with torch.no_grad():
            self.fc.bias[4] = -50.0  # planted: dead in every example

    def one(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.fc2(self.act(self.fc(x))))
        return h, self.silu(self.conv(img))  # the conv reads one (3, H, W) example: unbatched

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.vmap(self.one)(x, img)


def _per_example_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(n, 8, generator=g), "img": torch.randn(n, 3, 7, 6, generator=g)} for n in (5, 3)]


def test_a_function_mapped_over_the_examples_is_measured_on_every_example() -> None:
    torch.manual_seed(0)
    model, batches = PerExample().eval(), _per_example_batches()
    with torch.no_grad():  # the oracle: the same layers on the whole batch, no vmap
        z1 = [model.fc(b["x"]) for b in batches]
        z2 = [model.fc2(torch.relu(z)) for z in z1]
        z3 = [model.conv(b["img"]).movedim(1, -1) for b in batches]  # channels last for the oracle
        plain = [model(**b) for b in batches]
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = model.register_forward_hook(lambda m, args, out: outputs.append(out))
    report = deadneuron.audit(model, batches, progress=False, rules=False)
    handle.remove()
    cat = lambda zs: torch.cat([z.reshape(-1, z.shape[-1]) for z in zs]).numpy()  # noqa: E731
    sites = {s.module: s for s in report.sites.values()}
    _check(sites["act"], _oracle(cat(z1), np.maximum(cat(z1), 0), "relu"))
    _check(report.sites["fc2>gelu"], _oracle(cat(z2), F.gelu(torch.from_numpy(cat(z2))).numpy(), "gelu"))
    _check(sites["silu"], _oracle(cat(z3), F.silu(torch.from_numpy(cat(z3))).numpy(), "silu"))
    assert 4 in sites["act"].dead_channels and sites["silu"].channels == 5
    assert len(outputs) == len(plain)
    for got, want in zip(outputs, plain, strict=True):  # the model computed what it computes without the audit
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    named = [w for w in report.meta["warnings"] if "torch.func.vmap" in w]
    assert len(named) == 3 and all("2 of its 2 calls" in w for w in named)


def test_nested_vmap_and_a_mapped_dim_that_is_not_first() -> None:
    """vmap over vmap, the inner over dim 1: every example of both levels, the channel axis past them."""
    torch.manual_seed(0)
    fc, act = nn.Linear(6, 9), nn.ReLU()

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = fc, act

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (A, 6, B): inner level maps dim 1 of (6, B)
            return torch.func.vmap(torch.func.vmap(lambda r: self.act(self.fc(r)), in_dims=1))(x)

    model = Nested().eval()
    x = torch.randn(4, 6, 5)
    report = deadneuron.audit(model, [x], progress=False)
    with torch.no_grad():
        z = model.fc(x.transpose(1, 2)).numpy()  # (4, 5, 9)
    _check(report.sites["act"], _oracle(z, np.maximum(z, 0), "relu"))


def test_a_padding_mask_is_not_applied_inside_vmap_and_the_report_says_so() -> None:
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.act = nn.Embedding(20, 6), nn.Linear(6, 8), nn.ReLU()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.func.vmap(lambda e: self.act(self.fc(e)))(self.emb(input_ids))

    model = Tokens().eval()
    ids, mask = torch.randint(1, 20, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    report = deadneuron.audit(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    site = report.sites["act"]
    with torch.no_grad():
        z = model.fc(model.emb(ids)).numpy()
    _check(site, _oracle(z, np.maximum(z, 0), "relu"))  # every position: the padding counted
    assert not site.masked
    assert any("torch.func.vmap" in w and "padding mask is not applied" in w for w in report.meta["warnings"])


class Ensemble(nn.Module):
    """Three MLPs stacked with torch.func.stack_module_state and run with vmap over the members."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.base = copy.deepcopy(members[0])
        params, _ = torch.func.stack_module_state(members)  # type: ignore[arg-type]
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in params.items()})
        self.names = list(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = {name: self.params[name.replace(".", "_")] for name in self.names}
        return torch.func.vmap(lambda p, x: torch.func.functional_call(self.base, p, (x,)), in_dims=(0, None))(stacked, x)


def test_an_ensemble_run_with_vmap_pools_its_members_and_the_report_says_what_that_hides() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(3)]
    with torch.no_grad():
        for m in members:
            m[0].bias[1] = -50.0  # dead in every member
        members[0][0].bias[2] = -50.0  # dead in member 0 only
    model, x = Ensemble(members).eval(), torch.randn(10, 4)
    report = deadneuron.audit(model, [x], progress=False)
    (site,) = report.sites.values()
    with torch.no_grad():
        z = torch.stack([m[0](x) for m in members]).numpy()  # (3, 10, 6)
    _check(site, _oracle(z, np.maximum(z, 0), "relu"))  # every member's examples pooled per channel
    assert 1 in site.dead_channels and 2 not in site.dead_channels
    (warning,) = [w for w in report.meta["warnings"] if "torch.func.vmap" in w]
    assert "ensemble" in warning and "dead in every member" in warning


def test_a_flat_region_derived_inside_vmap_is_the_one_derived_outside() -> None:
    """GELU's flat region is derived on first use: inside vmap by torch.func.grad, else by autograd."""
    torch.manual_seed(0)
    fc = nn.Linear(8, 16)
    x = torch.randn(40, 8) * 3

    class Mapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.func.vmap(lambda r: F.gelu(self.fc(r)))(x)

    class Plain(Mapped):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.fc(x))

    inside = deadneuron.audit(Mapped().eval(), [x], progress=False)
    outside = deadneuron.audit(Plain().eval(), [x], progress=False)
    (a,), (b,) = inside.sites.values(), outside.sites.values()
    assert a.n == b.n == 40
    np.testing.assert_array_equal(a.channel_flat, b.channel_flat)
    np.testing.assert_array_equal(a.channel_zero, b.channel_zero)


def test_the_monitor_measures_vmapped_sites_each_window_and_says_their_gradient_is_not_followed() -> None:
    torch.manual_seed(0)
    model = PerExample()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = _per_example_batches() * 2
    with deadneuron.Monitor(model, every=2) as mon:
        for b in batches:
            h, s = model(**b)
            (h.sum() + s.sum()).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    assert len(mon.snapshots) == 2
    for snap in mon.snapshots:  # each window: the 5 + 3 examples of its two batches
        assert snap.sites["act"].n == 8 and snap.sites["silu"].n == 8 * 5 * 4
    vmapped = [w for w in mon.warnings if "torch.func.vmap on 2 of its 2 calls" in w]
    assert len(vmapped) == 3  # one per site, not one per window
    assert any(w.startswith("no gradient reached") and "Inside torch.func.vmap" in w for w in mon.warnings)
