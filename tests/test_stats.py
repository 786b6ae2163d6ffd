"""ChannelStats: streaming in random chunks equals one shot; merge equals one update over the concatenation."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import given, settings

from deadneuron.stats import ChannelStats, batch_stats, channel_view

VALUES = st.one_of(
    st.floats(-5, 5, allow_nan=False, width=32),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf")]),
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 4))
    inner = draw(st.integers(1, 5))
    vals = draw(st.lists(VALUES, min_size=n * c * inner, max_size=n * c * inner))
    return torch.tensor(vals, dtype=torch.float32).reshape(n, c, inner)


def _same(a: object, b: object) -> None:
    for field in ("n", "zero", "flat", "nonfinite"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("mean", "std", "min", "max"):
        x, y = np.array(getattr(a, field)), np.array(getattr(b, field))
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=field)


@settings(max_examples=60, deadline=None)
@given(x=tensors(), cuts=st.lists(st.integers(0, 12), max_size=4))
def test_streaming_equals_one_shot(x: torch.Tensor, cuts: list[int]) -> None:
    edges = sorted({0, x.shape[0], *[min(c, x.shape[0]) for c in cuts]})
    s = ChannelStats(x.shape[1])
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            s.update(x[lo:hi], x[lo:hi].relu(), lo=0.0, hi=math.inf, eps=0.0)
    _same(s.compute(), batch_stats(x, x.relu(), lo=0.0, hi=math.inf, eps=0.0))


@settings(max_examples=60, deadline=None)
@given(a=tensors(), b=tensors())
def test_merge_equals_concatenation(a: torch.Tensor, b: torch.Tensor) -> None:
    c = min(a.shape[1], b.shape[1])
    inner = min(a.shape[2], b.shape[2])
    a, b = a[:, :c, :inner], b[:, :c, :inner]
    sa, sb = ChannelStats(c), ChannelStats(c)
    sa.update(a, a, lo=-1.0, hi=1.0, eps=0.1)
    sb.update(b, b, lo=-1.0, hi=1.0, eps=0.1)
    both = torch.cat([a, b])
    _same(sa.merge(sb).compute(), batch_stats(both, both, lo=-1.0, hi=1.0, eps=0.1))


def test_one_shot_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, generator=g)
    x[0, 1, 2] = float("nan")
    x[1, 2, 0] = float("inf")
    got = batch_stats(x, x.relu(), lo=0.0, hi=math.inf, eps=0.0)
    a = x.relu().permute(1, 0, 2).reshape(3, -1).double().numpy()
    finite = np.isfinite(a)
    assert got.zero == (a == 0).sum(1).tolist()
    assert got.nonfinite == (~finite).sum(1).tolist()
    for c in range(3):
        vals = a[c][finite[c]]
        assert math.isclose(got.mean[c], vals.mean(), rel_tol=1e-6)
        assert math.isclose(got.std[c], vals.std(), rel_tol=1e-6)
        assert got.min[c] == vals.min() and got.max[c] == vals.max()


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
    sizes = [t.numel() for t in (s.zero, s.flat, s.nonfinite, s.sum, s.sumsq, s.min, s.max)]
    assert sizes == [64] * 7


def test_histogram_matches_numpy_digitize() -> None:
    from deadneuron.stats import HISTOGRAM_EDGES, ValueHistogram

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-5, 5, (500,), generator=g).double(), torch.zeros(40)])
    x[3], x[4] = float("nan"), float("inf")
    h = ValueHistogram()
    h.update(x[:300])
    h.update(x[300:])
    finite = x[torch.isfinite(x)].double().numpy()
    want = np.bincount(np.digitize(finite, np.array(HISTOGRAM_EDGES), right=True), minlength=len(HISTOGRAM_EDGES) + 1)
    assert h.compute() == want.tolist()
    zero_bin = int(np.searchsorted(np.array(HISTOGRAM_EDGES), 0.0))
    assert h.compute()[zero_bin] == 40 and not h.sampled


def test_audit_histograms_count_every_finite_value() -> None:
    import deadneuron
    from tests import zoo

    model = zoo.NaNLayer(zoo.Tap())
    report = deadneuron.audit(model, [torch.randn(6, 4) for _ in range(3)], histograms=True, progress=False)
    site = report.sites["act"]
    assert site.histogram is not None
    assert sum(site.histogram) == site.n * site.channels - site.nonfinite
    assert deadneuron.Report.from_json(report.to_json()).sites["act"].histogram == site.histogram
