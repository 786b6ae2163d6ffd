"""The row kernel's short-row lanes: batches that fit in cache with rows of 16 to 4095 contiguous elements
are summed channel by channel, 16 lanes kept in registers from row to row, each row's last inner % 16
elements in the first lanes, counts moved into double every 2**20 elements. And relu(z) with the default
thresholds (one comparison counts zero and flat; relu's range from z's) in every kernel: the long-row pass,
the lanes, the column kernel's tiles (batches in cache) and its plain loop. Checked against numpy over the
same values: tails, non-finite values in a tail, the count move, -inf in z, two threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deadneuron import _native
from tests.test_native import _check, _oracle, needs_native


def _planted(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x = x.masked_fill(torch.rand(shape, generator=g) < 0.3, 0.0)
    return x


@needs_native
@pytest.mark.parametrize("inner", [16, 17, 31, 49, 64, 100, 255, 900, 4095])
def test_short_rows_match_numpy(inner: int) -> None:
    x = _planted((7, 5, inner), inner)
    _check(x, None, 0.0, 0.0, math.inf)
    _check(x, x - 0.25, 0.01, -0.5, 2.0)  # flat region on a second tensor
    _check(x.double(), None, 0.0, 0.0, math.inf)


@needs_native
@pytest.mark.parametrize("where", ["tail", "vector", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_in_a_row_is_counted_as_numpy_counts_it(where: str, value: float) -> None:
    """inner 49: three full vectors and a tail of one per row; the value in the tail of row 2, in a
    vector of row 4, or at the batch's last element."""
    x = _planted((6, 3, 49), 11)
    z = x - 0.1
    for t in (x, z):
        pos = {"tail": (2, 1, 48), "vector": (4, 2, 20), "last": (5, 2, 48)}[where]
        t[pos] = value
        _check(x, None, 0.0, 0.0, math.inf)
        _check(x, z, 0.0, 0.0, math.inf)


@needs_native
def test_counts_stay_exact_past_the_move_into_double() -> None:
    """One channel of 2**21 + 3 * 1000 elements in rows of 1000 (the counts pass the move at 2**20, twice);
    every zero and flat count exact."""
    rows = 2**21 // 1000 + 3
    x = _planted((rows, 1, 1000), 3)
    _check(x, None, 0.0, -math.inf, 0.0)


def _relu_acc(z: torch.Tensor, threads: int) -> np.ndarray:
    assert _native.load() is not None
    acc = _native.fresh_accumulator(z.shape[1])
    counts = torch.zeros(2, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = _native.load().plan(z, 0.0, 0.0, math.inf, True, acc, counts, relu=True)
        assert run(z.data_ptr(), None) == 0
    finally:
        torch.set_num_threads(before)
    return acc.numpy().copy()


@needs_native
@pytest.mark.parametrize(
    "shape", [(16, 64, 49), (16, 128, 64), (4, 300, 256), (3, 3, 5000), (300, 40), (200_000, 24)], ids=str
)
def test_relu_from_z_and_two_threads_give_numpy_s_figures(shape: tuple[int, ...]) -> None:
    """relu(z)'s statistics read from z alone, flat tested on z (z = -inf: a 0 that is not flat), in the
    short-row lanes and (rows of 5000) the long-row pass; with the default thresholds both count zero and
    flat with one comparison and take the range from z's. One thread and two give the same figures to the
    bit (each thread sums whole channels)."""
    if len(shape) == 2:  # channels last, (rows, C) as (rows, C, 1): the column kernel, tiled (in cache) or not
        rows, c = shape
        z = _planted((rows, c, 1), 7) - 0.3
        z[5, 0, 0], z[7, 1, 0], z[rows - 1, 2, 0] = -math.inf, math.nan, math.inf
        z[:, 3] = -1.0  # a channel all below 0: relu's zeros only
    else:
        z = _planted(shape, 7) - 0.3
        z[0, 0, 5], z[1, 1, shape[2] - 1], z[2, 2, 0] = -math.inf, math.nan, math.inf
        z[0, 1] = -1.0  # a channel-row all below 0: relu's zeros only
    one, two = _relu_acc(z, 1), _relu_acc(z, 2)
    assert np.array_equal(one, two, equal_nan=True)
    want = _oracle(torch.relu(z), z, 0.0, 0.0, math.inf)
    for row in (0, 1, 2, 5, 6):
        assert np.array_equal(one[row], want[row]), row
    spread = np.sqrt(want[4] / np.maximum(want[2], 1))
    assert (np.abs(one[3] - want[3]) <= 1e-12 * (np.abs(want[3]) + spread)).all()
    assert (np.abs(one[4] - want[4]) <= 2e-12 * want[4]).all()


@needs_native
@pytest.mark.parametrize("channels", [6, 40])
def test_relu_of_valid_rows_read_in_place_matches_numpy(channels: int) -> None:
    """Tokens (positions, C, 1) under a padding mask: relu(z)'s statistics over the valid rows, read in
    place; a NaN and a -inf in left-out rows change nothing, a -inf in a kept row is a 0 that is not flat."""
    from deadneuron.stats import ChannelStats, Kernels

    z = _planted((300, channels, 1), 5) - 0.3
    keep = torch.arange(300)[torch.arange(300) % 3 != 1]
    z[1, 0, 0], z[4, 1, 0], z[6, 2, 0] = math.nan, -math.inf, -math.inf  # rows 1 and 4 left out, 6 kept
    stats = ChannelStats(channels, kernels=Kernels(compile=True))
    assert stats.update_relu_rows(z, keep, 0.0, (0.0, math.inf))
    got, kept = stats.acc.numpy(), z.index_select(0, keep)
    want = _oracle(torch.relu(kept), kept, 0.0, 0.0, math.inf)
    for row in (0, 1, 2, 5, 6):
        assert np.array_equal(got[row], want[row]), row
    np.testing.assert_allclose(got[3:5], want[3:5], rtol=1e-12)


def _acc(a3: torch.Tensor, f3: torch.Tensor | None, threads: int) -> np.ndarray:
    assert _native.load() is not None
    acc, counts = _native.fresh_accumulator(a3.shape[1]), torch.zeros(2, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _native.load().update(a3, f3, 0.01, -0.5, 0.5, True, acc, counts)
    finally:
        torch.set_num_threads(before)
    return acc.numpy().copy()


@needs_native
@pytest.mark.parametrize("channels", [8, 24, 64])
def test_narrow_channels_last_rows_split_over_threads_sum_as_one_thread(channels: int) -> None:
    """Rows too narrow to share by channels (under 512 bytes per thread) are split by stretches of 4096
    rows over the threads, each stretch summed on its own and added in stretch order: two threads give one
    thread's figures to the bit, and numpy's; a NaN in one stretch sends only that stretch to the checks."""
    a = _planted((50_000, channels, 1), channels)
    f = a - 0.2
    a[9000, 1, 0], f[30_000, 2, 0], a[49_999, 0, 0] = math.nan, -math.inf, math.inf
    one, two = _acc(a, f, 1), _acc(a, f, 2)
    assert np.array_equal(one, two, equal_nan=True)
    _check(a, f, 0.01, -0.5, 0.5)
