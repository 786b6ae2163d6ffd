"""The training monitor on sites the audit handles specially: a site fed inputs of different rank from step
to step (its activation and gradient figures per channel against torch over the pre-activations the model
stored itself, with their gradients), and a mixture-of-experts layer whose one expert no token is routed to
(the monitor says so once for that site, in the audit's words, not at every snapshot)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron

C = 6
DEAD = 2
CORE = "(every call had an empty input, or padding alone): nothing was measured there"


class Tokens(nn.Module):
    """Linear -> ReLU -> head, on (B, T, C) or (B, C) inputs; stores z (with its gradient) of each pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.head = nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 1)
        with torch.no_grad():
            self.lin.bias[DEAD] = -1e3
        self.z: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        z.retain_grad()
        self.z.append(z)
        return self.head(self.act(z))


def test_a_site_fed_other_ranks_from_step_to_step_is_measured_per_channel() -> None:
    torch.manual_seed(0)
    model = Tokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [torch.randn(2, 3, C), torch.randn(5, C), torch.randn(4, C), torch.randn(1, 2, C)]
    with deadneuron.Monitor(model, every=len(data)) as mon:
        for x in data:
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    z = torch.cat([t.detach().reshape(-1, C) for t in model.z]).numpy()
    g = torch.cat([t.grad.reshape(-1, C) for t in model.z]).numpy()  # type: ignore[union-attr]
    (snap,) = mon.snapshots
    site, detail = snap.sites["act"], mon.last_channels["act"]
    assert (site.channels, site.n, site.grad_elements) == (C, z.shape[0], z.shape[0])
    assert site.dead_channels == tuple(np.flatnonzero((z <= 0).all(0)).tolist()) == (DEAD,)
    np.testing.assert_allclose(detail.firing, (z > 0).mean(0))
    assert detail.grad_nonzero is not None and detail.grad_abs_mean is not None
    np.testing.assert_allclose(detail.grad_nonzero, (g != 0).mean(0))
    np.testing.assert_allclose(detail.grad_abs_mean, np.abs(g).mean(0), rtol=1e-5, atol=1e-12)


class MoE(nn.Module):
    """Two experts (Linear -> ReLU) behind a router that sends every token to expert 0; each expert is
    called on the tokens routed to it, none for expert 1 (an empty (0, C) input)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(C, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(C, C), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(C, 1)
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.copy_(torch.tensor([10.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for k, expert in enumerate(self.experts):
            idx = (choice == k).nonzero().squeeze(1)
            out = out.index_add(0, idx, expert(x[idx]))
        return self.head(out)


def test_an_expert_no_token_reaches_is_named_once_in_the_audits_words() -> None:
    torch.manual_seed(1)
    model = MoE()
    rows: dict[int, list[int]] = {0: [], 1: []}
    for k, expert in enumerate(model.experts):
        expert[1].register_forward_pre_hook(lambda m, args, k=k: rows[k].append(args[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadneuron.Monitor(model, every=2) as mon:
            for _ in range(6):
                loss = model(torch.randn(8, C)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step()
    assert len(mon.snapshots) == 3 and all(snap.sites["experts.1.1"].n == 0 for snap in mon.snapshots)
    assert set(rows[1]) == {0} and set(rows[0]) == {8}  # expert 1 ran on no token, expert 0 on every one
    said = [w for w in mon.warnings if "saw no element" in w]
    assert len(said) == 1
    assert said[0].startswith(f"site experts.1.1 ran but saw no element in the window of steps 0-1 {CORE}")
    assert "experts.0.1" not in said[0]
    shown = [str(w.message) for w in caught if "saw no element" in str(w.message)]
    assert shown == [f"deadneuron.Monitor: {said[0]}"]  # through the monitor's warning path, once

    audited = deadneuron.audit(model, [torch.randn(8, C)], rules=False)
    (words,) = [w for w in audited.meta["warnings"] if "saw no element" in w]
    assert words.startswith(f"site experts.1.1 ran but saw no element on the audit set {CORE}")


def test_a_site_that_saw_elements_is_not_named() -> None:
    torch.manual_seed(2)
    model = MoE()
    with torch.no_grad():
        model.router.bias.zero_()
        model.router.weight.copy_(torch.eye(2, C))  # a token goes where its first two features point
    with deadneuron.Monitor(model, every=1) as mon:
        for _ in range(2):
            model(torch.randn(16, C)).pow(2).mean().backward()
            mon.step()
    assert all(snap.sites[f"experts.{k}.1"].n > 0 for snap in mon.snapshots for k in (0, 1))
    assert not [w for w in mon.warnings if "saw no element" in w]


@pytest.mark.parametrize("every", [1, 3])
def test_each_new_empty_site_is_named_when_it_first_sees_nothing(every: int) -> None:
    """Expert 1 gets tokens in the first window, none after: it is named at the first window it saw nothing."""
    torch.manual_seed(3)
    model = MoE()
    with pytest.warns(RuntimeWarning, match="saw no element"), deadneuron.Monitor(model, every=every) as mon:
        for step in range(2 * every):
            with torch.no_grad():
                model.router.bias.copy_(torch.tensor([10.0, -10.0] if step >= every else [-10.0, 10.0]))
            model(torch.randn(4, C)).pow(2).mean().backward()
            mon.step()
    first, second = mon.snapshots
    assert first.sites["experts.1.1"].n > 0 and first.sites["experts.0.1"].n == 0
    assert second.sites["experts.1.1"].n == 0 and second.sites["experts.0.1"].n > 0
    said = [w for w in mon.warnings if "saw no element" in w]
    window = "step 0" if every == 1 else f"steps 0-{every - 1}"
    later = f"step {every}" if every == 1 else f"steps {every}-{2 * every - 1}"
    assert [w.split(" (")[0] for w in said] == [f"site experts.0.1 ran but saw no element in the window of {window}",
                                                 f"site experts.1.1 ran but saw no element in the window of {later}"]
