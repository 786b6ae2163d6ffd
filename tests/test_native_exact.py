"""The C kernel's moments are float64 sums of each batch alone: full precision whatever value a channel's
sums start from, and the same statistics however the batches are split over accumulators (ranks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deadneuron.stats import ChannelStats, Kernels
from tests.test_native import _check, _oracle, needs_native


@needs_native
@pytest.mark.parametrize("shape", [(4, 3, 100_000), (400_000, 3, 1), (25_000, 3, 16)], ids=str)
def test_an_outlier_where_the_sums_start_keeps_full_precision(shape: tuple[int, int, int]) -> None:
    """Each channel's sums start from its first finite element, here an outlier (after a NaN and an Inf
    in channel 0): shifted by it, q - s*s/n would lose about log10(n) digits of M2 (4e-11 relative at
    400,000 elements); the kernel sums such a channel again around its mean."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) + 3.0
    x[0, :, 0] = 1e4
    inner = shape[2]
    for p, value in enumerate((float("nan"), float("inf"), -1e4)):  # channel 0's first three, in (o, i) order
        x[p // inner, 0, p % inner] = value
    for layout in (x, x.permute(0, 2, 1).contiguous().permute(0, 2, 1)):  # rows or grouped; columns
        _check(layout, None, 0.0, 0.0, math.inf)
        _check(layout.double(), None, 0.0, 0.0, math.inf)


@needs_native
@pytest.mark.parametrize("offset", [0.0, 2e4])
@pytest.mark.parametrize("shape", [(4, 6, 300), (64, 6, 1), (8, 6, 16)], ids=str)
def test_a_batch_adds_the_same_whatever_came_before(offset: float, shape: tuple[int, int, int]) -> None:
    """Five float32 batches in one accumulator, or split 3 + 2 over two accumulators merged (what ranks
    do): the same statistics to 1e-12, and those of numpy over all the values."""
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(shape, generator=g, dtype=torch.float64) * (1 + k) + offset).float() for k in range(5)]
    whole, even, odd = (ChannelStats(shape[1], kernels=Kernels(compile=True)) for _ in range(3))
    for k, x in enumerate(data):
        whole.update_output(x, 0.0, flat=(0.0, math.inf))
        (even if k % 2 == 0 else odd).update_output(x, 0.0, flat=(0.0, math.inf))
    assert whole.kernels.name == "native"
    want = _oracle(torch.cat(data), None, 0.0, 0.0, math.inf)
    for got in (whole.acc.numpy(), even.merge(odd).acc.numpy()):
        assert np.array_equal(got[[0, 1, 2, 5, 6]], want[[0, 1, 2, 5, 6]])
        np.testing.assert_allclose(got[3:5], want[3:5], rtol=1e-12)
