"""The channel axis through ops along one dim (sorts, top-k, cumulative ops, differences, repeats, narrowing),
reductions with tuple results (``max(dim)``, ``median``, ``kthvalue``, ``std_mean``...), ``select``, ``t()``,
``adjoint`` and a tensor of indices: before, their outputs had no traced axis, and conv maps ``(N, C, L)`` sorted
along L read L as the channels (a warned guess) and ``t()`` of ``(N, C)`` read N as the channels (silently, by
rank). The oracle: numpy over the op's output computed by the test from the conv output its own hook stored,
per channel along the dim the test knows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

C, L = 6, 7
IDX = torch.tensor([0, 3, 5])
# op on (N, C, L) conv maps -> (op, the channel dim of its result)
OPS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "sort": (lambda h: h.sort(2).values, 1),
    "topk": (lambda h: h.topk(3, dim=2)[0], 1),
    "cummax": (lambda h: h.cummax(2).values, 1),
    "logcumsumexp": (lambda h: torch.logcumsumexp(h, 2), 1),
    "diff": (lambda h: torch.diff(h, dim=2), 1),
    "repeat_interleave": (lambda h: h.repeat_interleave(2, dim=2), 1),
    "narrow": (lambda h: h.narrow(2, 1, 4), 1),
    "repeat": (lambda h: h.repeat(2, 1, 1), 1),
    "tile": (lambda h: h.tile((1, 1, 2)), 1),
    "max(dim)": (lambda h: h.max(2).values, 1),
    "min(dim)": (lambda h: torch.min(h, dim=2)[0], 1),
    "median": (lambda h: h.median(2).values, 1),
    "kthvalue": (lambda h: h.kthvalue(2, 2).values, 1),
    "quantile": (lambda h: torch.quantile(h, 0.5, dim=2), 1),
    "std_mean": (lambda h: torch.std_mean(h, 2)[1], 1),
    "aminmax": (lambda h: torch.aminmax(h, dim=2).max, 1),
    "select": (lambda h: h.select(2, 3), 1),
    "t()": (lambda h: h.select(2, 0).t(), 0),
    "adjoint": (lambda h: h.adjoint(), 2),
    "h[:, :, idx]": (lambda h: h[:, :, IDX], 1),
    "max(a, b)": (lambda h: torch.max(h, h.flip(2)), 1),
}
DEAD = (1, 4)


class Net(nn.Module):
    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv, self.op = nn.Conv1d(3, C, 1), op
        with torch.no_grad():
            for c in DEAD:
                self.conv.bias[c] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.op(self.conv(x)))


@pytest.mark.parametrize("name", list(OPS))
def test_the_channel_axis_is_carried_through_the_op(name: str) -> None:
    op, dim = OPS[name]
    torch.manual_seed(0)
    model = Net(op).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 3, L, generator=g) for _ in range(2)]  # N=5: no dim of another size matches C
    kept: list[torch.Tensor] = []
    hook = model.conv.register_forward_hook(lambda m, a, o: kept.append(o.detach().clone()))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    z = np.concatenate([op(k).double().movedim(dim, -1).reshape(-1, C).numpy() for k in kept])
    report = deadneuron.audit(model, batches, progress=False)
    (s,) = report.sites.values()
    assert s.channels == C and s.channel_axis % len(s.shape) == dim and s.axis_source == "traced", (s.shape, s.axis_source)
    assert np.array_equal(np.asarray(s.channel_flat), (z <= 0).mean(0))
    assert list(s.dead_channels) == list(np.flatnonzero((z <= 0).all(0)))
    assert name == "diff" or set(DEAD) <= set(s.dead_channels)  # (a difference takes the bias away)


@pytest.mark.parametrize("op", [lambda h: h.sort(1).values, lambda h: h.cummax(1).values, lambda h: h[:, IDX]],
                         ids=["sort over C", "cummax over C", "indices over C"])  # fmt: skip
def test_an_op_along_the_channel_dim_carries_no_axis(op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Its entries along that dim are no longer channels (the j-th largest, a running maximum, picked ones)."""
    report = deadneuron.audit(Net(op).eval(), [torch.randn(5, 3, L)], progress=False)
    (s,) = report.sites.values()
    assert s.axis_source != "traced"
