"""The C statistics kernel equals numpy float64 over the same values on every layout it reads, agrees with
the eager torch kernels, and the audit falls back to torch cleanly where the kernel cannot be built."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import deadneuron
from deadneuron import _native
from deadneuron.stats import ChannelStats, Kernels, channel_view

native = _native.load()
needs_native = pytest.mark.skipif(native is None, reason=f"C kernel unavailable: {_native.load_error()}")

SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-30]


def test_the_kernel_loads_where_a_compiler_exists() -> None:
    """Where it is skipped below, say why as a failure: a kernel that no longer builds, or that the
    load-time self-check refuses, would otherwise only show as skipped tests."""
    import os
    import shutil

    if os.environ.get("DEADNEURON_NATIVE", "1") == "0" or not any(
        shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")
    ):
        pytest.skip("no C compiler, or the kernel is turned off")
    assert native is not None, _native.load_error()


def _oracle(a3: torch.Tensor, f3: torch.Tensor | None, eps: float, lo: float, hi: float) -> np.ndarray:
    """(zero, flat, finite, mean, m2, min, max) per channel in numpy float64 over the same values
    (thresholds in the input's precision, as the kernel compares them)."""
    dt = np.float32 if a3.dtype == torch.float32 else np.float64
    eps, lo, hi = (float(dt(t)) for t in (eps, lo, hi))
    per_channel = (a3.shape[1], a3.shape[0] * a3.shape[2])
    a = a3.double().permute(1, 0, 2).reshape(per_channel).numpy()
    f = a if f3 is None else f3.double().permute(1, 0, 2).reshape(per_channel).numpy()
    finite = np.isfinite(a)
    with np.errstate(invalid="ignore"):
        rows = [(np.abs(a) <= eps).sum(1), (np.isfinite(f) & ((f <= lo) | (f >= hi))).sum(1), finite.sum(1)]
    vals = [a[c][finite[c]] for c in range(a.shape[0])]
    rows.append(np.array([v.mean() if v.size else 0.0 for v in vals]))
    rows.append(np.array([((v - v.mean()) ** 2).sum() if v.size else 0.0 for v in vals]))
    rows.append(np.array([v.min() if v.size else np.inf for v in vals]))
    rows.append(np.array([v.max() if v.size else -np.inf for v in vals]))
    return np.stack(rows).astype(np.float64)


def _run(a3: torch.Tensor, f3: torch.Tensor | None, eps: float, lo: float, hi: float) -> tuple[torch.Tensor, list[float]]:
    assert native is not None
    acc = _native.fresh_accumulator(a3.shape[1])
    counts = torch.zeros(2, dtype=torch.float64)
    native.update(a3, f3, eps, lo, hi, True, acc, counts)
    return acc, counts.tolist()


def _check(a3: torch.Tensor, f3: torch.Tensor | None, eps: float, lo: float, hi: float) -> None:
    acc, counts = _run(a3, f3, eps, lo, hi)
    got, want = acc.numpy(), _oracle(a3, f3, eps, lo, hi)
    assert counts == [a3.shape[0] * a3.shape[2]] * 2
    for row, name in enumerate(("zero", "flat", "finite")):
        assert np.array_equal(got[row], want[row]), (name, got[row], want[row])
    # moments: summed in float64 whatever the input's precision
    tol = 1e-12
    spread = np.sqrt(want[4] / np.maximum(want[2], 1))
    assert (np.abs(got[3] - want[3]) <= tol * (np.abs(want[3]) + spread)).all(), ("mean", got[3], want[3])
    assert (np.abs(got[4] - want[4]) <= 2 * tol * want[4]).all(), ("m2", got[4], want[4])
    assert np.array_equal(got[5:], want[5:]), ("range", got[5:], want[5:])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None, float, float, float]:
    """An (outer, C, inner) view in one of the memory layouts the kernel reads."""
    outer = draw(st.integers(1, 12))
    c = draw(st.integers(1, 70))
    inner = draw(st.sampled_from([1, 2, 3, 5, 16, 31, 32, 63, 64, 65, 130, 256, 300]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(outer, c, inner, generator=g, dtype=dtype) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    flat = x.view(-1)
    for _ in range(draw(st.integers(0, 4))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.3, 0.0)
    if layout == "channels_last":  # channels contiguous: strides (inner*C, 1, C)
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    elif layout == "sliced":  # a channel slice of a wider tensor
        x = torch.cat([x, x[:, :1]], 1)[:, : x.shape[1]]
    elif layout == "transposed":  # neither channels nor inner contiguous: the kernel asks for a copy
        x = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    with_f = draw(st.booleans())
    f3 = (x * 2 - 1).contiguous() if with_f else None
    eps = draw(st.sampled_from([0.0, 1e-3, 0.5]))
    lo, hi = draw(st.sampled_from([(0.0, math.inf), (-1.0, 1.0), (-math.inf, 2.5), (math.nan, math.nan)]))
    return x, f3, eps, lo, hi


@needs_native
@settings(max_examples=150, deadline=None)
@given(case=layouts())
def test_kernel_equals_numpy(case: tuple[torch.Tensor, torch.Tensor | None, float, float, float]) -> None:
    x, f3, eps, lo, hi = case
    _check(x, f3, eps, lo, hi)


@needs_native
@pytest.mark.parametrize(
    "shape", [(2, 3, 9000), (5000, 3, 1), (3, 2, 4100), (1, 1, 1), (4, 0, 5), (0, 3, 2)], ids=str
)
def test_kernel_long_rows_columns_and_empty(shape: tuple[int, int, int]) -> None:
    """Rows and columns longer than one partial-sum stretch (4096), and empty tensors."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    if x.numel():
        x.view(-1)[x.numel() // 2] = float("nan")
        x.view(-1)[-1] = -float("inf")
    _check(x, None, 0.0, 0.0, math.inf)


@needs_native
def test_nan_threshold_counts_no_flat_and_empty_region() -> None:
    x = torch.tensor([[[-math.inf, -1.0, 0.0, 1.0, math.inf]]])
    got, _ = _run(x, None, 0.0, math.nan, math.nan)
    assert got[1].tolist() == [0.0]
    got, _ = _run(x, None, 0.0, 0.0, math.inf)
    assert got[1].tolist() == [2.0]  # -1 and 0 are <= 0; -inf <= 0 and +inf >= inf, but never flat
    got, _ = _run(x, torch.tensor([[[-1.0, math.inf, -math.inf, math.nan, 0.0]]]), 0.0, 0.0, math.inf)
    assert got[1].tolist() == [2.0] and got[2].tolist() == [3.0]  # flat on f, finite on a


@needs_native
@pytest.mark.parametrize("offset", [0.0, 2e4])
def test_channel_stats_native_equals_eager_over_a_stream(offset: float) -> None:
    g = torch.Generator().manual_seed(2)
    fast, slow = ChannelStats(8, kernels=Kernels(compile=True)), ChannelStats(8)
    assert fast.kernels.native is not None
    for k in range(5):
        x = torch.randn(3 + k, 8, 7, generator=g) + offset
        x[0, k, 0] = float("nan")
        x[1, 7 - k, 1] = float("inf")
        for s in (fast, slow):
            s.update_output(x.relu(), 0.0, flat=(0.0, math.inf))
            s.update_output(x, 0.1)  # no flat region: counts nothing, tests nothing
            s.update_output(x.relu(), 0.0, flat=(0.0, math.inf), z3=x.contiguous())
            s.update_flat(x, -1.0, 1.0)
    a, b = fast.compute(), slow.compute()
    assert (a.n, a.zero, a.flat, a.nonfinite) == (b.n, b.zero, b.flat, b.nonfinite)
    assert a.mean == pytest.approx(b.mean, rel=1e-12)
    assert a.std == pytest.approx(b.std, rel=1e-12)
    assert a.min == b.min and a.max == b.max
    assert torch.equal(fast.counts, slow.counts)
    assert fast.kernels.name == "native"


def _bn_relu_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(), torch.nn.Linear(16 * 30 * 30, 32), torch.nn.GELU(),
    )
    with torch.no_grad():
        model[1].bias[:5] = -50.0  # planted: 5 dead channels
        model[1].num_batches_tracked += 1
    return model.eval()


def test_audit_falls_back_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = _bn_relu_model()
    reference = deadneuron.audit(model, data, progress=False, compile=False)
    assert reference.meta["kernels"] == "eager"
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setenv("DEADNEURON_NATIVE", "0")
    # the second fallback: torch.compile (a cold compile takes seconds), used for the conv output
    # (57,600 elements); the GELU's 128 stay eager (a compiled call costs more than that)
    fallback = deadneuron.audit(model, data, progress=False)
    assert fallback.meta["kernels"].startswith("compiled+eager (turned off by DEADNEURON_NATIVE=0)"), fallback.meta
    assert fallback.sites["2"].dead_channels == reference.sites["2"].dead_channels == (0, 1, 2, 3, 4)
    for name, site in reference.sites.items():
        other = fallback.sites[name]
        assert (site.channel_zero, site.channel_flat, site.channel_nonfinite) == (
            other.channel_zero, other.channel_flat, other.channel_nonfinite
        )
        assert other.channel_mean == pytest.approx(site.channel_mean, rel=1e-5, abs=1e-6)


@needs_native
def test_audit_with_kernel_equals_eager_audit() -> None:
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = _bn_relu_model()
    fast = deadneuron.audit(model, data, progress=False)
    slow = deadneuron.audit(model, data, progress=False, compile=False)
    assert fast.meta["kernels"] == "native"
    for name, site in slow.sites.items():
        other = fast.sites[name]
        assert (site.dead_channels, site.dormant_channels, site.channel_zero, site.channel_flat) == (
            other.dead_channels, other.dormant_channels, other.channel_zero, other.channel_flat
        )
        assert other.channel_mean == pytest.approx(site.channel_mean, rel=1e-12, abs=1e-300)
        assert other.channel_std == pytest.approx(site.channel_std, rel=1e-12, abs=1e-300)


def test_build_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setenv("DEADNEURON_NATIVE", "1")
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(_native, "_compiler", lambda: str(tmp_path / "no-such-compiler"))
    assert _native.load() is None
    assert "could not build" in (_native.load_error() or "")
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").glob("*"))  # nothing half-written left


@needs_native
def test_build_is_cached_and_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(tmp_path))
    for _ in range(2):
        monkeypatch.setattr(_native, "_tried", False)
        monkeypatch.setattr(_native, "_loaded", None)
        assert _native.load() is not None
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 2 and built[0].startswith("stats-") and built[1] == built[0].replace(".sha256", ".so"), built


def test_channels_last_conv_output_is_read_in_place() -> None:
    """A channels_last activation gives a (N, C, HW) view with channel stride 1: no copy needed."""
    x = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    v = channel_view(x, 1)
    assert v.stride()[1] == 1 and v.data_ptr() == x.data_ptr()


@needs_native
@pytest.mark.parametrize("shape", [(9, 70, 1), (9, 7, 300), (12, 20, 16)], ids=str)
def test_channel_ranges_add_up_to_the_whole(shape: tuple[int, int, int]) -> None:
    """The C entry point takes a channel range [c0, c1): ranges that tile the channels give exactly
    the whole-batch result, elements counted once."""
    assert native is not None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    fn = native._fns[torch.float32]
    whole, parts = _native.fresh_accumulator(shape[1]), _native.fresh_accumulator(shape[1])
    cw, cp = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    args = (x.data_ptr(), None, *x.shape, *x.stride(), 0.0, 0.0, math.inf, 1)
    assert fn(*args, whole.data_ptr(), cw.data_ptr(), 0, shape[1], 1) == 0
    edges = [0, 3, shape[1] // 2, shape[1]]
    for c0, c1 in itertools.pairwise(edges):
        assert fn(*args, parts.data_ptr(), cp.data_ptr(), c0, c1, 1) == 0
    assert torch.equal(whole, parts) and torch.equal(cw, cp)
    threaded, ct = _native.fresh_accumulator(shape[1]), torch.zeros(2, dtype=torch.float64)
    assert fn(*args, threaded.data_ptr(), ct.data_ptr(), 0, shape[1], 3) == 0  # three ranges at once
    assert torch.equal(whole, threaded) and torch.equal(cw, ct)
    assert fn(*args, parts.data_ptr(), cp.data_ptr(), 2, shape[1] + 1, 1) == 2  # out of range: refused


def _reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_error", None)


@needs_native
def test_a_damaged_cache_entry_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(tmp_path / "first"))
    _reload(monkeypatch)
    built = _native.load()
    assert built is not None
    # the same entry in another cache, damaged (e.g. copied half-way by a backup tool); a loaded
    # library is never written over: that would crash this process
    damaged = tmp_path / "second" / built.path.name
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a shared object")
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(damaged.parent))
    _reload(monkeypatch)
    again = _native.load()
    assert again is not None and again.path == damaged and damaged.read_bytes() != b"not a shared object"


@needs_native
def test_an_unusable_cache_folder_builds_in_a_temporary_one(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(blocker / "cache"))  # cannot be created: a file is in the way
    _reload(monkeypatch)
    native_ = _native.load()
    assert native_ is not None, _native.load_error()
    assert not str(native_.path).startswith(str(tmp_path))
    assert not native_.path.parent.exists()  # the temporary folder is gone; the library stays loaded
    acc, counts = _native.fresh_accumulator(1), torch.zeros(2, dtype=torch.float64)
    native_.update(torch.full((1, 1, 3), 2.0), None, 0.0, 0.0, math.inf, True, acc, counts)
    assert acc[2:5].flatten().tolist() == [3.0, 2.0, 0.0] and counts.tolist() == [3.0, 3.0]  # finite, mean, m2
    assert native_.note is not None and native_.note.startswith("built in a private temporary folder: cannot use")


@needs_native
def test_bundled_arc_checkpoint_same_report_with_kernel_and_eager() -> None:
    """End to end on the sick demo checkpoint (11 sites: the shared encoder ReLU at 4 places, the
    slot MLP called 3 times, decoder 1x1 convs; grids of many sizes): identical counts per channel."""
    from pathlib import Path

    from arc_model.adapter import ArcSlotAdapter

    adapter = ArcSlotAdapter()
    ckpt = torch.load(Path(__file__).resolve().parents[1] / "checkpoints" / "slot_attention.pth", weights_only=True)
    model = adapter.load(ckpt)
    batches = list(adapter.batches("heldout", ckpt["config"], max_grids=96))
    fast = deadneuron.audit(model, batches, adapter=adapter, progress=False)
    slow = deadneuron.audit(model, batches, adapter=adapter, progress=False, compile=False)
    assert fast.meta["kernels"] == "native" and slow.meta["kernels"] == "eager"
    assert list(fast.sites) == list(slow.sites) and len(fast.sites) == 11
    for name, s in slow.sites.items():
        f = fast.sites[name]
        assert (f.n, f.dead_channels, f.dormant_channels, f.channel_zero, f.channel_flat) == (
            s.n, s.dead_channels, s.dormant_channels, s.channel_zero, s.channel_flat
        ), name
        assert f.channel_mean == pytest.approx(s.channel_mean, rel=1e-12, abs=1e-300), name
        assert f.channel_std == pytest.approx(s.channel_std, rel=1e-12, abs=1e-300), name
        assert (f.channel_min, f.channel_max) == (s.channel_min, s.channel_max), name
    assert fast.summary.dead == slow.summary.dead > 0


@needs_native
def test_a_kernel_that_disagrees_with_torch_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time self-check: a miscompiled kernel (simulated: it drops the NaN count) is refused
    with the reason, and the audit runs on torch."""
    real = _native.NativeStats.update

    def miscompiled(self, a3, f3, eps, lo, hi, count_flat, acc, counts):  # noqa: ANN001, ANN202
        real(self, a3, f3, eps, lo, hi, count_flat, acc, counts)
        acc[2].zero_()

    monkeypatch.setattr(_native.NativeStats, "update", miscompiled)
    _reload(monkeypatch)
    assert _native.load() is None
    assert "disagreed with the torch reference" in (_native.load_error() or "")


@needs_native
@pytest.mark.parametrize("shape", [(16, 64, 1024), (16, 256, 16), (512, 300, 1)], ids=str)
def test_threads_split_channels_exactly(shape: tuple[int, int, int]) -> None:
    """A batch above PARALLEL_MIN_ELEMENTS is split by channels over torch's threads: the result is
    the one-thread result, bit for bit (each channel is still reduced in the same order)."""
    assert native is not None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    x[1, 2, 0] = float("nan")
    assert x.numel() >= _native.PARALLEL_MIN_ELEMENTS
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run(x, None, 0.0, 0.0, math.inf))
    finally:
        torch.set_num_threads(before)
    for acc, counts in results[1:]:
        assert torch.equal(acc, results[0][0]) and counts == results[0][1]


@needs_native
def test_no_threads_beside_a_second_openmp_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Where the kernel would not share torch's OpenMP runtime, it runs on one thread."""
    monkeypatch.setattr(_native, "_openmp_runtimes", lambda: 2)
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(tmp_path))
    _reload(monkeypatch)
    loaded = _native.load()
    assert loaded is not None and not loaded.threaded
