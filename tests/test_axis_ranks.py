"""A site fed inputs of different rank across batches or calls keeps reading the channel dim the model's own
layers put it on: a ReLU after ``nn.Linear`` reads the last dim of a (B, T, C) and of a (B, C) input alike;
after ``nn.Conv1d`` the dim before the length of a batched (N, C, L) and of an unbatched (C, L) input.
A channel count that really changes, or a channel dim that moves between ranks, stops the audit with one
line. The oracle is numpy over the pre-activations the model stored itself (forward pre-hooks registered
here), every row of every call, with a channel planted dead (its bias far below its inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.errors import UsageError

C = 6
DEAD = 4


def _plant(layer: nn.Linear | nn.Conv1d | nn.BatchNorm1d) -> None:
    with torch.no_grad():
        layer.bias[DEAD] = -1e3  # channel DEAD is negative on every input


def _stored(act: nn.Module) -> list[torch.Tensor]:
    """The inputs ``act`` is called on, in call order (a pre-hook of the test's own)."""
    seen: list[torch.Tensor] = []
    act.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _rows(zs: Sequence[torch.Tensor], dims: Sequence[int]) -> np.ndarray:
    """Every stored z as rows of C channels, the channel dim of each given."""
    return np.concatenate([np.moveaxis(z.numpy(), d, -1).reshape(-1, C) for z, d in zip(zs, dims, strict=True)])


def _check(site: Any, z: np.ndarray) -> None:
    """The site's per-channel figures against numpy over the rows ``z`` (ReLU: flat where z <= 0)."""
    a = np.maximum(z, 0)
    assert (site.channels, site.n) == (C, z.shape[0])
    assert site.dead_channels == tuple(np.flatnonzero((z <= 0).all(0)).tolist()) == (DEAD,)
    np.testing.assert_allclose(site.channel_flat, (z <= 0).mean(0))
    np.testing.assert_allclose(site.channel_zero, (a == 0).mean(0))
    np.testing.assert_allclose(site.channel_mean, a.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(site.channel_max, a.max(0), rtol=1e-6)
    np.testing.assert_allclose(site.channel_min, a.min(0), rtol=1e-6)


class LinearReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(C, C), nn.ReLU()
        _plant(self.lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


@pytest.mark.parametrize("shapes", [[(2, 4, C), (5, C)], [(5, C), (2, 4, C), (3, 2, 2, C)]], ids=["3d-2d", "2d-3d-4d"])
def test_a_linear_site_fed_batches_of_different_rank_reads_the_last_dim_of_each(shapes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    model = LinearReLU()
    zs = _stored(model.act)
    report = deadneuron.audit(model, [torch.randn(s) for s in shapes], rules=False)
    site = report.sites["act"]
    _check(site, _rows(zs, [-1] * len(zs)))
    assert (site.axis_source, site.calls) == ("producer", len(shapes))
    assert site.channel_axis == len(site.shape) - 1  # as a dim of the example shape shown beside it


def test_a_module_called_twice_per_batch_on_ranks_that_swap_between_batches() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = LinearReLU()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.inner(x).sum() + self.inner(y).sum()

    torch.manual_seed(1)
    model = Twice()
    zs = _stored(model.inner.act)
    batches = [{"x": torch.randn(2, 4, C), "y": torch.randn(5, C)}, {"x": torch.randn(3, C), "y": torch.randn(1, 2, C)}]
    report = deadneuron.audit(model, batches, rules=False)
    assert list(report.sites) == ["inner.lin>act#0", "inner.lin>act#1"]  # call order within a forward pass
    _check(report.sites["inner.lin>act#0"], _rows(zs[0::2], [-1, -1]))
    _check(report.sites["inner.lin>act#1"], _rows(zs[1::2], [-1, -1]))


def test_one_relu_shared_by_linears_on_tokens_and_on_rows_keeps_each_apart() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(C, C), nn.Linear(C, C), nn.ReLU()
            _plant(self.a)
            _plant(self.b)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.act(self.a(x)).sum() + self.act(self.b(y)).sum()

    torch.manual_seed(2)
    model = Shared()
    zs = _stored(model.act)
    batches = [{"x": torch.randn(2, 4, C), "y": torch.randn(5, C)}, {"x": torch.randn(1, 3, C), "y": torch.randn(2, C)}]
    report = deadneuron.audit(model, batches, rules=False)
    _check(report.sites["a>act"], _rows(zs[0::2], [-1, -1]))
    _check(report.sites["b>act"], _rows(zs[1::2], [-1, -1]))


def test_a_residual_traced_to_the_last_dim_keeps_it_across_ranks() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(C, C)
            _plant(self.lin)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.lin(x) + 0.0 * x)

    torch.manual_seed(3)
    model = Residual()
    zs: list[torch.Tensor] = []
    model.lin.register_forward_hook(lambda m, args, out: zs.append((out + 0.0 * args[0]).detach().clone()))
    report = deadneuron.audit(model, [torch.randn(2, 3, C), torch.randn(4, C), torch.randn(C)], rules=False)
    (name,) = report.sites
    assert report.sites[name].axis_source == "traced"
    _check(report.sites[name], _rows(zs, [-1] * len(zs)))


class ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv1d(C, C, 1), nn.ReLU()
        _plant(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


@pytest.mark.parametrize("order", ["unbatched-first", "batched-first"])
def test_a_conv_site_fed_unbatched_and_batched_inputs_reads_the_dim_before_the_length(order: str) -> None:
    # L == C: the dim after the channels has as many entries, so reading the wrong one would not stop the audit
    torch.manual_seed(4)
    model = ConvReLU()
    zs = _stored(model.act)
    shapes = [(C, C), (3, C, C)] if order == "unbatched-first" else [(3, C, C), (C, C)]
    report = deadneuron.audit(model, [torch.randn(s) for s in shapes], rules=False)
    _check(report.sites["act"], _rows(zs, [z.dim() - 2 for z in zs]))


def test_a_batchnorm1d_site_fed_rows_then_sequences_reads_dim_1() -> None:
    torch.manual_seed(5)
    bn = nn.BatchNorm1d(C).eval()
    _plant(bn)
    model = nn.Sequential(bn, nn.ReLU())
    zs = _stored(model[1])
    report = deadneuron.audit(model, [torch.randn(5, C), torch.randn(2, C, 3)], rules=False)
    _check(report.sites["1"], _rows(zs, [1, 1]))


def _one_line(error: pytest.ExceptionInfo[UsageError], *words: str) -> None:
    text = str(error.value)
    assert "\n" not in text
    for word in words:
        assert word in text


@pytest.mark.parametrize("ranks", [(3, 2), (2, 3)])
def test_a_channel_count_that_changes_with_the_rank_is_refused(ranks: tuple[int, int]) -> None:
    class Grows(nn.Module):
        """One functional site whose linear map has C outputs on inputs of the first rank, C + 1 on others."""

        def __init__(self) -> None:
            super().__init__()
            self.small, self.big = nn.Parameter(torch.randn(C, C)), nn.Parameter(torch.randn(C + 1, C))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(F.linear(x, self.small if x.dim() == ranks[0] else self.big))

    shapes = {2: (5, C), 3: (2, 4, C)}
    with pytest.raises(UsageError) as error:
        deadneuron.audit(Grows(), [torch.randn(shapes[r]) for r in ranks], rules=False)
    _one_line(error, "site 'relu'", f"has {C + 1} entries", f"held {C} channels before", "--channel-axis")


def test_a_channel_dim_that_moves_between_ranks_is_refused() -> None:
    class Moves(nn.Module):
        """A conv map scaled by a tensor: the channel dim is carried by position from the front, so an
        unbatched call puts it on dim 0 where the site, first fed batches, reads dim 1."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(C, C, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return F.relu(y.transpose(-1, -2).transpose(-1, -2) * torch.ones(()))

    model = Moves()
    zs: list[torch.Tensor] = []
    model.conv.register_forward_hook(lambda m, args, out: zs.append(out.detach().clone()))
    with pytest.raises(UsageError) as error:
        deadneuron.audit(model, [torch.randn(3, C, C), torch.randn(C, C)], rules=False)
    _one_line(error, "site 'relu'", f"input {(C, C)}", "another rank", "--channel-axis")
    assert [tuple(z.shape) for z in zs] == [(3, C, C), (C, C)]  # the model ran both: the site refused the second
