"""The statistics read through prepared kernel calls equal numpy float64 over the same values: a site's
tensor as it comes (any memory layout, the channel on any axis), the flat counts taken alone before an
in-place call, and a padding mask's valid rows read in place. Also where the layout changes between
calls, where the accumulator is replaced, and where the C kernel does not apply (the general path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deadneuron import _native
from deadneuron.kernels import Kernels
from deadneuron.stats import ChannelStats

native = _native.load()
needs_native = pytest.mark.skipif(native is None, reason=f"C kernel unavailable: {_native.load_error()}")


def _awkward(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 0.5
    flat = x.view(-1)
    flat[::11] = 0.0
    flat[3], flat[7 % flat.numel()] = float("nan"), float("inf")
    flat[-2] = -float("inf")
    return x


def _per_channel(x: torch.Tensor, axis: int) -> np.ndarray:
    """(C, elements) float64 numpy: each channel's values (any order)."""
    return x.detach().double().movedim(axis, 0).reshape(x.shape[axis], -1).numpy()


def _oracle(a: np.ndarray, f: np.ndarray | None, eps: float, lo: float, hi: float) -> dict[str, np.ndarray]:
    f = a if f is None else f
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        out = {"zero": (np.abs(a) <= eps).sum(1), "flat": (np.isfinite(f) & ((f <= lo) | (f >= hi))).sum(1),
               "finite": finite.sum(1)}  # fmt: skip
    vals = [row[ok] for row, ok in zip(a, finite, strict=True)]
    out["mean"] = np.array([v.mean() if v.size else 0.0 for v in vals])  # a channel with no finite value:
    out["m2"] = np.array([((v - v.mean()) ** 2).sum() if v.size else 0.0 for v in vals])  # the kernel's empty
    out["min"] = np.array([v.min() if v.size else np.inf for v in vals])  # state
    out["max"] = np.array([v.max() if v.size else -np.inf for v in vals])
    return out


def _assert_matches(s: ChannelStats, want: dict[str, np.ndarray], n: int, flat_n: int) -> None:
    got = s.acc.numpy()
    assert s.counts.tolist() == [n, flat_n]
    for row, key in enumerate(("zero", "flat", "finite")):
        assert np.array_equal(got[row], want[key]), key
    spread = np.sqrt(want["m2"] / np.maximum(want["finite"], 1))
    assert (np.abs(got[3] - want["mean"]) <= 1e-12 * (np.abs(want["mean"]) + spread)).all()
    assert (np.abs(got[4] - want["m2"]) <= 2e-12 * want["m2"]).all()
    assert np.array_equal(got[5], want["min"]) and np.array_equal(got[6], want["max"])


LAYOUTS = [
    ("conv maps (N, C, H, W)", (4, 6, 5, 7), 1, None),
    ("channels-last conv maps", (4, 6, 5, 7), 1, torch.channels_last),
    ("tokens (N, L, C)", (3, 9, 40), -1, None),
    ("channels last (N, H, W, C) of a permuted map", (3, 40, 4, 5), 1, "permuted"),
    ("a transposed matrix", (12, 9), 0, "transposed"),
    ("spatial dims swapped in memory (the view would copy)", (4, 6, 5, 7), 1, "swapped"),
    ("one sample (C,)", (17,), 0, None),
]


def _make(shape: tuple[int, ...], layout: object, seed: int) -> torch.Tensor:
    x = _awkward(shape, seed)
    if layout is torch.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # (N, C, H, W) values read through an (N, H, W, C) tensor's permute back
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "swapped":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


@needs_native
@pytest.mark.parametrize(("what", "shape", "axis", "layout"), LAYOUTS, ids=[w for w, *_ in LAYOUTS])
def test_prepared_calls_equal_numpy_on_every_layout(what: str, shape: tuple[int, ...], axis: int, layout: object) -> None:
    s = ChannelStats(shape[axis], kernels=Kernels())
    a_all, z_all = [], []
    for seed in range(3):  # the second and third calls reuse the prepared call
        z = _make(shape, layout, seed)
        a = torch.nn.functional.gelu(z)
        s.update_output_along(a, axis, 0.0, flat=(-2.0, math.inf), z=z)
        a_all.append(_per_channel(a, axis))
        z_all.append(_per_channel(z, axis))
    want = _oracle(np.concatenate(a_all, 1), np.concatenate(z_all, 1), 0.0, np.float32(-2.0), math.inf)
    per = a_all[0].shape[1]
    _assert_matches(s, want, 3 * per, 3 * per)
    assert s.kernels.name == "native"


@needs_native
@pytest.mark.parametrize(("what", "shape", "axis", "layout"), LAYOUTS, ids=[w for w, *_ in LAYOUTS])
def test_flat_counts_alone_equal_numpy(what: str, shape: tuple[int, ...], axis: int, layout: object) -> None:
    """The pre-hook's pass before an in-place call: finite values in the region, per channel."""
    s = ChannelStats(shape[axis], kernels=Kernels())
    z = _make(shape, layout, 5)
    s.update_flat_along(z, axis, -0.5, 1.0)
    s.update_flat_along(z[None][0], axis, -0.5, 1.0)  # the same layout again: the prepared call
    f = _per_channel(z, axis)
    with np.errstate(invalid="ignore"):
        want = 2 * (np.isfinite(f) & ((f <= np.float32(-0.5)) | (f >= 1.0))).sum(1)
    assert np.array_equal(s.acc[1].numpy(), want)
    assert s.counts.tolist() == [0, 2 * f.shape[1]]
    assert s.acc[0].abs().sum() == 0 and s.acc[2].abs().sum() == 0  # nothing but the flat counts


@needs_native
def test_kernels_flat_equals_numpy_on_channels_last_and_strided_rows() -> None:
    k = Kernels()
    for z3 in (_awkward((50, 70, 1), 1), _awkward((6, 9, 33), 2)[:, :, ::3], _awkward((8, 300, 4), 3)):
        f = z3.double().permute(1, 0, 2).reshape(z3.shape[1], -1).numpy()
        with np.errstate(invalid="ignore"):
            want = (np.isfinite(f) & ((f <= 0.0) | (f >= 2.0))).sum(1)
        assert np.array_equal(k.flat(z3, 0.0, 2.0).numpy(), want)


@needs_native
def test_valid_rows_read_in_place_equal_numpy_over_those_rows() -> None:
    """A padding mask's valid token rows: the statistics of exactly those rows, not of the padding."""
    x = _awkward((5 * 12, 48, 1), 4)
    z = x - 0.25
    keep = torch.rand(60, generator=torch.Generator().manual_seed(0)) > 0.4
    rows = keep.nonzero().squeeze(1)
    s = ChannelStats(48, kernels=Kernels())
    s.update_output_rows(x, rows, 0.0, flat=(0.0, math.inf), z3=z)
    s.update_output_rows(x, rows[:3], 0.0, flat=(0.0, math.inf), z3=z)  # fewer rows, the same prepared call
    picked = torch.cat([rows, rows[:3]])
    a = x[picked].squeeze(2).double().t().numpy()
    f = z[picked].squeeze(2).double().t().numpy()
    _assert_matches(s, _oracle(a, f, 0.0, 0.0, math.inf), len(picked), len(picked))


@needs_native
def test_a_replaced_accumulator_is_written_not_the_old_one() -> None:
    """State swapped in from elsewhere (a merge, another process's figures): later batches go into it."""
    x = _awkward((4, 8, 10), 6)
    once = _oracle(_per_channel(x, 1), None, 0.0, math.nan, math.nan)
    s = ChannelStats(8, kernels=Kernels())
    s.update_output_along(x, 1, 0.0)
    old = s.acc
    s.acc, s.counts = s.acc.clone(), s.counts.clone()
    s.update_output_along(x, 1, 0.0)
    assert np.array_equal(old[2].numpy(), once["finite"])  # left as it was
    assert np.array_equal(s.acc[2].numpy(), 2 * once["finite"]) and s.counts[0].item() == 80
    s.reset()
    s.update_output_along(x, 1, 0.0)
    assert np.array_equal(s.acc[2].numpy(), once["finite"]) and s.counts[0].item() == 40


def test_without_the_c_kernel_the_same_figures() -> None:
    """compile=False: the eager torch reference takes every call (no prepared call)."""
    x = _awkward((3, 9, 40), 7)
    s = ChannelStats(40, kernels=Kernels(compile=False))
    s.update_output_along(x, -1, 0.0, flat=(0.0, math.inf), z=x)
    s.update_flat_along(x, -1, 0.0, math.inf)
    want = _oracle(_per_channel(x, -1), None, 0.0, 0.0, math.inf)
    assert s.kernels.name == "eager"
    assert np.array_equal(s.acc[1].numpy(), 2 * want["flat"]) and np.array_equal(s.acc[2].numpy(), want["finite"])
    assert s.counts.tolist() == [27, 54]


def test_half_precision_takes_the_general_path() -> None:
    x = _awkward((4, 6, 5), 8).half()
    s = ChannelStats(6, kernels=Kernels())
    s.update_output_along(x, 1, 0.0)
    want = _oracle(_per_channel(x, 1), None, 0.0, math.nan, math.nan)
    assert np.array_equal(s.acc[2].numpy(), want["finite"]) and np.array_equal(s.acc[5].numpy(), want["min"])
