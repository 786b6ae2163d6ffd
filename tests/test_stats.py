"""ChannelStats against numpy float64 over the same values: streaming, merging, large means, non-finite
values, half-precision inputs, every kernel; ValueHistogram against a numpy binning of the same values."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from deadneuron import _native
from deadneuron.stats import HISTOGRAM_EDGES, ChannelStats, Kernels, ValueHistogram, batch_stats, channel_view

NATIVE = _native.load()
KERNELS = ["eager", pytest.param("native", marks=pytest.mark.skipif(NATIVE is None, reason="no C kernel"))]
# every kernel sums each batch's moments in float64 (the C kernel shifted by a value of the batch)
MOMENT_RTOL = {"eager": 1e-12, "compiled": 1e-12, "native": 1e-12}
WITH_COMPILED = [*KERNELS, "compiled"]  # torch.compile: seconds per graph, so only where it matters

VALUES = st.one_of(
    st.floats(-5, 5, allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf")]),
)


def _kernels(name: str) -> Kernels:
    kernels = Kernels(compile=name != "eager", native=name == "native", min_compiled_numel=0)
    assert (kernels.native is not None) == (name == "native")
    return kernels


def _ran(kernels: Kernels, name: str) -> None:
    """The kernel asked for did the work (a failed compile would fall back to eager silently)."""
    assert kernels.name == name, (kernels.name, kernels.fallback_reason)


def oracle(a3: np.ndarray, z3: np.ndarray, *, eps: float, lo: float | np.ndarray, hi: float) -> dict[str, np.ndarray]:
    """DESIGN section 3, per channel, in numpy float64 over (outer, C, inner) arrays. Thresholds are
    compared in float32, as the kernels compare them with float32 (or half-precision) tensors."""
    eps, hi, lo = float(np.float32(eps)), float(np.float32(hi)), np.asarray(lo, dtype=np.float32)
    a = np.moveaxis(np.asarray(a3, dtype=np.float64), 1, 0).reshape(a3.shape[1], -1)
    z = np.moveaxis(np.asarray(z3, dtype=np.float64), 1, 0).reshape(a3.shape[1], -1)
    lo_c = np.broadcast_to(np.asarray(lo, dtype=np.float64).reshape(-1, 1), (a.shape[0], 1))
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        out = {
            "zero": (np.abs(a) <= eps).sum(1), "flat": (np.isfinite(z) & ((z <= lo_c) | (z >= hi))).sum(1),
            "nonfinite": (~finite).sum(1),
        }
    rows = [a[c][finite[c]] for c in range(a.shape[0])]
    out["mean"] = np.array([r.mean() if r.size else np.nan for r in rows])
    out["std"] = np.array([r.std() if r.size else np.nan for r in rows])
    out["min"] = np.array([r.min() if r.size else np.nan for r in rows])
    out["max"] = np.array([r.max() if r.size else np.nan for r in rows])
    return out


def assert_matches(got: object, want: dict[str, np.ndarray], n: int, rtol: float) -> None:
    assert got.n == n
    for key in ("zero", "flat", "nonfinite"):
        assert getattr(got, key) == want[key].tolist(), key
    for key in ("min", "max"):
        np.testing.assert_array_equal(np.array(getattr(got, key)), want[key], err_msg=key)
    scale = np.nan_to_num(want["std"], nan=0.0)  # a mean near 0 is held to the channel's spread
    for key in ("mean", "std"):
        g, w = np.array(getattr(got, key)), want[key]
        assert np.array_equal(np.isnan(g), np.isnan(w)), key
        ok = np.isnan(w) | (np.abs(g - w) <= rtol * (np.abs(w) + scale))
        assert ok.all(), (key, g[~ok], w[~ok])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 4))
    inner = draw(st.integers(1, 5))
    vals = draw(st.lists(VALUES, min_size=n * c * inner, max_size=n * c * inner))
    return torch.tensor(vals, dtype=torch.float32).reshape(n, c, inner)


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=40, deadline=None)
@given(x=tensors(), cuts=st.lists(st.integers(0, 12), max_size=4), offset=st.sampled_from([0.0, 100.0]))
def test_streaming_in_chunks_equals_numpy_one_shot(kernel: str, x: torch.Tensor, cuts: list[int], offset: float) -> None:
    x = x + offset
    edges = sorted({0, x.shape[0], *[min(c, x.shape[0]) for c in cuts]})
    s = ChannelStats(x.shape[1], kernels=_kernels(kernel))
    for lo, hi in itertools.pairwise(edges):
        s.update(x[lo:hi], x[lo:hi].relu(), lo=offset, hi=math.inf, eps=0.0)
    want = oracle(x.relu().numpy(), x.numpy(), eps=0.0, lo=offset, hi=math.inf)
    assert_matches(s.compute(), want, x.shape[0] * x.shape[2], MOMENT_RTOL[kernel])


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=40, deadline=None)
@given(a=tensors(), b=tensors(), scale=st.sampled_from([1.0, 1e3]))
def test_merge_equals_numpy_over_the_concatenation(kernel: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    c, inner = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    a, b = a[:, :c, :inner] * scale, b[:, :c, :inner] + 7.0
    sa, sb = ChannelStats(c, kernels=_kernels(kernel)), ChannelStats(c, kernels=_kernels(kernel))
    sa.update(a, a, lo=-1.0, hi=1.0, eps=0.1)
    for part in (b[:1], b[1:]):  # two batches on one side: a merge of unequal histories
        sb.update(part, part, lo=-1.0, hi=1.0, eps=0.1)
    both = torch.cat([a, b]).numpy()
    want = oracle(both, both, eps=0.1, lo=-1.0, hi=1.0)
    assert_matches(sa.merge(sb).compute(), want, both.shape[0] * inner, MOMENT_RTOL[kernel])
    assert_matches(sb.merge(sa).compute(), want, both.shape[0] * inner, MOMENT_RTOL[kernel])


@pytest.mark.parametrize("kernel", WITH_COMPILED)
@pytest.mark.parametrize("mean", [1e4, 2e4])
@pytest.mark.parametrize("layout", ["rows", "columns", "grouped"])
def test_large_mean_small_std_keeps_its_std(kernel: str, mean: float, layout: str) -> None:
    """float32 activations with mean 2e4 and std 1: sum/sumsq arithmetic gave std 44 or 0."""
    g = torch.Generator().manual_seed(1)
    shape = {"rows": (16, 3, 900), "columns": (512, 5, 1), "grouped": (64, 3, 16)}[layout]
    s = ChannelStats(shape[1], kernels=_kernels(kernel))
    batches = [(torch.randn(shape, generator=g, dtype=torch.float64) + mean).float() for _ in range(3)]
    for x in batches:
        s.update_output(x, 0.0, flat=(0.0, math.inf))
    values = np.concatenate([x.numpy() for x in batches])
    want = oracle(values, values, eps=0.0, lo=0.0, hi=math.inf)
    got = s.compute()
    _ran(s.kernels, kernel)
    np.testing.assert_allclose(got.std, want["std"], rtol=1e-12)
    np.testing.assert_allclose(got.mean, want["mean"], rtol=1e-12)
    assert min(got.std) > 0.9 and max(got.std) < 1.1


@pytest.mark.parametrize("kernel", WITH_COMPILED)
@pytest.mark.parametrize("on", ["output", "z"])
def test_nonfinite_channels_are_never_flat(kernel: str, on: str) -> None:
    """Channels of +Inf, -Inf and NaN: counted as non-finite, never in the flat region (here z <= 0 or
    z >= 5, so +Inf >= hi and -Inf <= lo would have counted), no moments; a finite channel beside."""
    x = torch.tensor([math.inf, -math.inf, math.nan, -1.0]).repeat(4, 300, 1).permute(0, 2, 1).contiguous()
    z3 = x if on == "z" else None
    a3 = torch.where(x.isfinite(), x.abs(), x) if on == "z" else x
    s = ChannelStats(4, kernels=_kernels(kernel))
    s.update_output(a3, 0.0, flat=(0.0, 5.0), z3=z3)
    got = s.compute()
    assert got.flat == [0, 0, 0, 1200]
    assert got.nonfinite == [1200, 1200, 1200, 0]
    assert math.isnan(got.mean[0]) and math.isnan(got.std[1]) and math.isnan(got.min[2])
    flat_only = ChannelStats(4, kernels=_kernels(kernel))
    flat_only.update_flat(x, 0.0, 5.0)
    flat_only.update_flat(x, torch.tensor([0.0, 0.0, 0.0, -math.inf]), 5.0)  # per channel (PReLU)
    assert flat_only.compute().flat == [0, 0, 0, 1200]
    _ran(s.kernels, kernel)


def test_nan_thresholds_count_nothing() -> None:
    x = torch.tensor([[[-math.inf, -1.0, 0.0, 1.0, math.inf, math.nan]]])
    for kernel in ("eager", *(["native"] if NATIVE is not None else [])):
        s = ChannelStats(1, kernels=_kernels(kernel))
        s.update_output(x, 0.0, flat=(math.nan, math.nan))
        s.update_output(x, 0.0)  # no flat region: tests nothing
        assert s.compute().flat == [0] and s.flat_n.item() == 6 and s.n.item() == 12


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_counts_are_exact(kernel: str, dtype: torch.dtype) -> None:
    """Rows of 5000 elements: summed in fp16 (exact to 2048) or bf16 (exact to 256) counts drift."""
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(3, 4, 5000, generator=g) * 3).to(dtype)
    z[0, 1, :7] = math.inf
    a = torch.nn.functional.leaky_relu(z.float(), 0.01).to(dtype)
    s = ChannelStats(4, kernels=_kernels(kernel))
    s.update_output(a, 0.05, flat=(0.0, math.inf), z3=z)
    prelu = ChannelStats(4, kernels=_kernels(kernel))
    prelu.update_flat(z, torch.tensor([0.0, -math.inf, 0.0, 0.0]), math.inf)
    want = oracle(a.float().numpy(), z.float().numpy(), eps=0.05, lo=0.0, hi=math.inf)
    got = s.compute()
    assert_matches(got, want, 3 * 5000, MOMENT_RTOL[kernel])
    per_channel = oracle(a.float().numpy(), z.float().numpy(), eps=0.0, lo=np.array([0.0, -np.inf, 0.0, 0.0]), hi=math.inf)
    assert prelu.compute().flat == per_channel["flat"].tolist()


def test_one_shot_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, generator=g)
    x[0, 1, 2] = float("nan")
    x[1, 2, 0] = float("inf")
    got = batch_stats(x, x.relu(), lo=0.0, hi=math.inf, eps=0.0)
    assert_matches(got, oracle(x.relu().numpy(), x.numpy(), eps=0.0, lo=0.0, hi=math.inf), 35, 1e-12)


def test_channel_view_axes() -> None:
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert channel_view(x, 1).shape == (2, 3, 20)
    assert channel_view(x, -1).shape == (24, 5, 1)
    assert torch.equal(channel_view(x, -1)[:, 2, 0], x[..., 2].reshape(-1))


def test_state_is_o_channels() -> None:
    s = ChannelStats(64)
    for _ in range(5):
        x = channel_view(torch.randn(8, 64, 30, 30), 1)
        s.update(x, x.relu(), lo=0.0, hi=math.inf, eps=0.0)
    assert s.acc.shape == (7, 64) and s.counts.shape == (2,)
    assert s.state_bytes() == (7 * 64 + 2) * 8


def _numpy_histogram(values: np.ndarray) -> list[int]:
    finite = values[np.isfinite(values)].astype(np.float32).astype(np.float64)
    edges = np.array(HISTOGRAM_EDGES, dtype=np.float32).astype(np.float64)
    return np.bincount(np.digitize(finite, edges, right=True), minlength=len(edges) + 1).tolist()


def test_histogram_matches_numpy_digitize() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-5, 5, (500,), generator=g).double(), torch.zeros(40)])
    x[3], x[4] = float("nan"), float("inf")
    h = ValueHistogram()
    h.update(x[:300])
    h.update(x[300:])
    assert h.compute() == _numpy_histogram(x.float().numpy())
    zero_bin = int(np.searchsorted(np.array(HISTOGRAM_EDGES), 0.0))
    assert h.compute()[zero_bin] == 40 and not h.sampled


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.one_of(VALUES, st.sampled_from(HISTOGRAM_EDGES), st.floats(-1e6, 1e6, width=32)), max_size=200))
def test_histogram_of_any_values_and_exact_edges(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    h, other = ValueHistogram(), ValueHistogram()
    h.update(x[: len(values) // 2])
    other.update(x[len(values) // 2 :].to(torch.bfloat16).float())
    want_other = _numpy_histogram(x[len(values) // 2 :].to(torch.bfloat16).float().numpy())
    want = np.add(_numpy_histogram(x[: len(values) // 2].numpy()), want_other).tolist()
    assert h.merge(other).compute() == want


def test_audit_histograms_count_every_finite_value() -> None:
    import deadneuron
    from tests import zoo

    model = zoo.NaNLayer(zoo.Tap())
    report = deadneuron.audit(model, [torch.randn(6, 4) for _ in range(3)], histograms=True, progress=False)
    site = report.sites["act"]
    assert site.histogram is not None
    assert sum(site.histogram) == site.n * site.channels - site.nonfinite
    assert deadneuron.Report.from_json(report.to_json()).sites["act"].histogram == site.histogram
