"""The C kernel's gradient-flow sums (per channel: sum |dL/dz| in float64 and the count of dL/dz != 0) against
plain numpy, directly on every layout it reads and inside deadneuron.Monitor over the gradients a hook of
the test stored itself; and the Monitor's figures with the kernel against those of the torch path."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import deadneuron
from deadneuron import _native

native = _native.load()
needs_native = pytest.mark.skipif(native is None, reason=f"C kernel unavailable: {_native.load_error()}")
NAN, INF = float("nan"), float("inf")


def _oracle(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy, in float64: per channel (dim ``axis``) sum |x| and the count of x != 0; both NaN for a channel
    holding a NaN."""
    x = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    l1 = np.abs(x).sum(1)
    nonzero = (x != 0).sum(1).astype(np.float64)
    nonzero[np.isnan(l1)] = np.nan
    return l1, nonzero


def _plant(x: torch.Tensor, axis: int, seed: int = 0) -> torch.Tensor:
    """Write, through any view: zeros, -0.0 and subnormals here and there, a NaN in channel 1, +Inf and -Inf
    in channel 2, and an all-zero last channel."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.rand(x.shape, generator=gen)
    x.masked_fill_(pick < 0.25, 0.0).masked_fill_((pick > 0.9) & (pick < 0.95), -0.0)
    x.masked_fill_(pick >= 0.95, torch.finfo(x.dtype).tiny / 8)
    first, last = [0] * x.dim(), [n - 1 for n in x.shape]
    for at, channel, value in ((last, 1, NAN), (first, 2, INF), (last, 2, -INF)):
        at[axis] = channel
        x[tuple(at)] = value
    x.select(axis, -1).zero_()
    return x


def _kernel(x3: torch.Tensor, *, counted: bool = True, start: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    assert native is not None
    acc = torch.full((x3.shape[1],), start, dtype=torch.float64)
    cnt = torch.full((x3.shape[1],), start, dtype=torch.float64)
    assert native.flow_plan(x3, acc, cnt if counted else None)(x3.data_ptr(), None) == 0
    return acc.numpy(), cnt.numpy()


def _same(got: np.ndarray, want: np.ndarray, *, rtol: float) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


# (logical shape, channel axis, how it is laid out in memory): every path of the kernel
LAYOUTS = {
    "NCHW": ((4, 6, 5, 7), 1, None),  # runs of 35 elements, rows of outer < 8: channel by channel
    "NCHW long rows": ((2, 5, 90, 60), 1, None),  # runs longer than FLUSH (4096)
    "channels-last": ((4, 6, 5, 7), 1, torch.channels_last),  # columns (sc == 1)
    "channels-last 70": ((3, 70, 4, 5), 1, torch.channels_last),  # two column blocks, a partial tile
    "tokens (N, T, C)": ((3, 5, 40), 2, None),  # columns over N*T rows
    "NCHW small maps": ((9, 6, 2, 2), 1, None),  # whole rows of C x 4: columns grouped per channel
    "strided": ((4, 6, 5, 14), 1, "strided"),  # every other element: any strides
}


def _laid_out(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    shape, axis, layout = LAYOUTS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    if layout is torch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    return _plant(x, axis), axis


def _view(x: torch.Tensor, axis: int) -> torch.Tensor:
    view = x.reshape(-1, x.shape[-1], 1) if axis == x.dim() - 1 else x.reshape(x.shape[0], x.shape[1], -1)
    assert view.data_ptr() == x.data_ptr()
    return view


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kernel_sums_match_numpy_on_every_layout(name: str, dtype: torch.dtype) -> None:
    x, axis = _laid_out(name, dtype)
    l1, nonzero = _oracle(x.numpy(), axis)
    assert np.isnan(l1[1]) and np.isinf(l1[2]) and l1[-1] == 0 and nonzero[-1] == 0  # the planted values
    got_l1, got_nonzero = _kernel(_view(x, axis))
    _same(got_l1, l1, rtol=1e-12)
    np.testing.assert_array_equal(got_nonzero, nonzero)
    # added into what the accumulators held; without the counts, those are left alone
    more_l1, more_nonzero = _kernel(_view(x, axis), start=2.0)
    _same(more_l1, l1 + 2, rtol=1e-12)
    np.testing.assert_array_equal(more_nonzero, nonzero + 2)
    only_l1, untouched = _kernel(_view(x, axis), counted=False, start=2.0)
    _same(only_l1, l1 + 2, rtol=1e-12)
    assert (untouched == 2.0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kernel_sums_chosen_rows_in_place(dtype: torch.dtype) -> None:
    """A padding mask's valid tokens: the kernel reads the chosen outer rows where they lie."""
    assert native is not None
    x = _plant(torch.randn(12, 30, dtype=dtype), 1)
    keep = torch.tensor([11, 0, 4, 5, 9])
    acc, cnt = torch.zeros(30, dtype=torch.float64), torch.zeros(30, dtype=torch.float64)
    x3 = x.reshape(12, 30, 1)
    assert native.flow_plan(x3, acc, cnt).rows(x3.data_ptr(), None, keep * x3.stride(0)) == 0
    l1, nonzero = _oracle(x.numpy()[keep.numpy()], 1)
    _same(acc.numpy(), l1, rtol=1e-12)
    np.testing.assert_array_equal(cnt.numpy(), nonzero)


@needs_native
@pytest.mark.parametrize("shape", [(16, 64, 1024), (4096, 96, 1)], ids=str)
def test_threads_split_channels_exactly(shape: tuple[int, int, int]) -> None:
    """Above PARALLEL_MIN_ELEMENTS the channels are split over torch's threads: bit for bit the one-thread sums."""
    x = _plant(torch.randn(shape), 1)
    assert x.numel() >= _native.PARALLEL_MIN_ELEMENTS
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_kernel(x))
    finally:
        torch.set_num_threads(before)
    for l1, nonzero in results[1:]:
        np.testing.assert_array_equal(l1, results[0][0])
        np.testing.assert_array_equal(nonzero, results[0][1])


@needs_native
def test_a_kernel_whose_flow_sums_disagree_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time self-check covers the gradient-flow sums: a build that drops the counts (simulated)
    is refused with the reason, and everything runs on torch."""
    real = _native.NativeStats.flow_plan
    monkeypatch.setattr(_native.NativeStats, "flow_plan", lambda self, x3, abs_sum, nonzero: real(self, x3, abs_sum, None))
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_error", None)
    assert _native.load() is None
    assert "gradient-flow sums disagreed with the torch reference" in (_native.load_error() or "")


# -- inside the Monitor -------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """The identity forward; backward, the gradient's channels (dim 1) scaled by ``weight``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * weight[:, None, None], None


class Sites(nn.Module):
    """Sites on every layout: conv -> GELU (NCHW or channels-last; its |a| summed for tau), conv -> ReLU
    (exact zero gradients where z <= 0), linear -> GELU on (N, T, C) tokens. The backward pass scales the
    GELU's gradient per channel by ``weight`` (NaN, Inf, 0: a channel with no gradient at all) without
    changing the forward pass. A hook of the model's own stores every dL/dz and output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.gelu, self.relu = nn.GELU(), nn.ReLU()
        self.fc, self.tok = nn.Linear(6, 5), nn.GELU()
        self.register_buffer("weight", torch.ones(8))
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def _keep(self, name: str, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        z.register_hook(lambda g: self.grads.setdefault(name, []).append(g.detach().clone()))
        self.outputs.setdefault(name, []).append(a.detach().clone())
        return a

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.conv1(x)
        h = _ScaleGrad.apply(self._keep("gelu", z, self.gelu(z)), self.weight)
        z = self.conv2(h)
        h = self._keep("relu", z, self.relu(z))
        z = self.fc(h.flatten(2).transpose(1, 2))  # tokens (N, H*W, 5)
        t = self._keep("tok", z, self.tok(z))
        keep = torch.ones(t.shape[:2], dtype=t.dtype) if attention_mask is None else attention_mask.to(t.dtype)
        return (t * keep[..., None]).sum(1)


AXES = {"gelu": 1, "relu": 1, "tok": 2}


def _train(model: Sites, batches: list[torch.Tensor], *, steps_with_opt: bool = True, **options: object) -> deadneuron.Monitor:
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with deadneuron.Monitor(model, every=len(batches), **options) as mon:  # type: ignore[arg-type]
        for x in batches:
            loss = model(x, attention_mask=_token_mask(x)).square().mean()
            opt.zero_grad()
            loss.backward()
            if steps_with_opt:
                opt.step()
            mon.step()
    return mon


def _token_mask(x: torch.Tensor) -> torch.Tensor:
    """Tokens of each image valid up to a length that differs per row (the padding is the rest)."""
    n, tokens = x.shape[0], x.shape[2] * x.shape[3]
    return (torch.arange(tokens)[None] < torch.arange(n)[:, None] * 3 + 4).long()


def _batches(dtype: torch.dtype, memory_format: torch.memory_format, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 5, 6, generator=gen, dtype=dtype).contiguous(memory_format=memory_format)
            for _ in range(steps)]  # fmt: skip


def _model(dtype: torch.dtype, memory_format: torch.memory_format, weight: list[float] | None = None) -> Sites:
    torch.manual_seed(0)
    model = Sites().to(dtype=dtype, memory_format=memory_format)
    if weight is not None:
        model.weight.copy_(torch.tensor(weight))
    return model


def _check_against_numpy(mon: deadneuron.Monitor, model: Sites, *, masked: bool, batches: list[torch.Tensor],
                         rtol: float = 1e-12) -> None:  # fmt: skip
    (snap,) = mon.snapshots
    for name, axis in AXES.items():
        grads = [g.numpy() for g in model.grads[name]]
        if masked and name == "tok":  # the valid tokens only
            grads = [g[_token_mask(x).bool().numpy()][None] for g, x in zip(grads, batches, strict=True)]
        g = np.concatenate([np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]) for a in grads])
        l1, nonzero = _oracle(g, 1)
        detail, site = mon.last_channels[name], snap.sites[name]
        assert site.grad_elements == g.shape[0], name
        assert detail.grad_nonzero is not None and detail.grad_abs_mean is not None
        np.testing.assert_array_equal(detail.grad_nonzero, nonzero / g.shape[0], err_msg=name)
        _same(detail.grad_abs_mean, l1 / g.shape[0], rtol=rtol)
    outputs = np.concatenate([np.moveaxis(a.numpy(), 1, -1).reshape(-1, 8) for a in model.outputs["gelu"]])
    _same(mon.last_channels["gelu"].abs_mean, np.abs(outputs.astype(np.float64)).mean(0), rtol=rtol)


@needs_native
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked tokens"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_monitor_gradient_flow_matches_numpy_over_the_stored_gradients(
    dtype: torch.dtype, memory_format: torch.memory_format, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    real = _native.NativeStats.flow_plan
    monkeypatch.setattr(_native.NativeStats, "flow_plan", lambda self, x3, *a: calls.append(x3.stride()) or real(self, x3, *a))
    batches = _batches(dtype, memory_format)
    model = _model(dtype, memory_format)
    mon = _train(model, batches, mask="attention_mask" if masked else None)
    assert len(calls) >= 4  # the kernel summed every site (prepared once per layout and window)
    if memory_format is torch.channels_last:
        assert model.grads["gelu"][0].is_contiguous(memory_format=torch.channels_last)
    _check_against_numpy(mon, model, masked=masked, batches=batches)


@pytest.mark.parametrize("compile", [pytest.param(True, marks=needs_native), False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_inf_and_a_channel_without_gradient(dtype: torch.dtype, compile: bool) -> None:
    """The GELU's channel 1 gets NaN gradients, channel 2 infinite ones (and NaN), channel 3 none at all.
    The torch path (``compile=False``: CUDA, float16) too: a NaN gradient is no zero, its channel's share of
    non-zero gradients is NaN, never a count that leaves the NaN elements out."""
    batches = _batches(dtype, torch.contiguous_format, steps=2)
    model = _model(dtype, torch.contiguous_format, [1, NAN, INF, 0, 1, 1, 1, 1])
    mon = _train(model, batches, steps_with_opt=False, compile=compile)
    rtol = 1e-6 if dtype is torch.float32 and not compile else 1e-12  # torch sums float32 rows in float32
    _check_against_numpy(mon, model, masked=False, batches=batches, rtol=rtol)
    detail = mon.last_channels["gelu"]
    assert detail.grad_abs_mean is not None and detail.grad_nonzero is not None
    assert np.isnan(detail.grad_abs_mean[1]) and np.isnan(detail.grad_nonzero[1])
    stored = np.concatenate([g[:, 2].numpy().ravel() for g in model.grads["gelu"]])
    assert np.isinf(stored).any()  # (where dL/dh is exactly 0, Inf * 0 made NaN: the numpy check above covers both)
    assert detail.grad_nonzero[3] == 0 == detail.grad_abs_mean[3]
    assert 3 in mon.snapshots[0].sites["gelu"].not_learning_channels


@needs_native
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked tokens"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_monitor_figures_with_the_kernel_equal_the_torch_path(
    dtype: torch.dtype, memory_format: torch.memory_format, masked: bool
) -> None:
    """``compile=False`` runs the reference torch kernels (no C kernel, for the statistics and the gradient
    flow). Counts agree exactly; the sums of |x| to 1e-12 in float64. In float32 the torch path sums each
    row in float32 (about 1e-7 relative), the kernel in float64."""
    batches = _batches(dtype, memory_format)
    model = _model(dtype, memory_format)
    reference = copy.deepcopy(model)
    mask = "attention_mask" if masked else None
    fast, slow = _train(model, batches, mask=mask), _train(reference, batches, mask=mask, compile=False)
    rtol = 1e-12 if dtype is torch.float64 else 1e-6
    for name in AXES:
        a, b = fast.last_channels[name], slow.last_channels[name]
        assert a.grad_nonzero is not None and b.grad_nonzero is not None and a.grad_abs_mean is not None
        np.testing.assert_array_equal(a.grad_nonzero, b.grad_nonzero, err_msg=name)
        _same(a.grad_abs_mean, b.grad_abs_mean, rtol=rtol)  # type: ignore[arg-type]
        _same(a.abs_mean, b.abs_mean, rtol=rtol)
        assert fast.snapshots[0].sites[name].grad_elements == slow.snapshots[0].sites[name].grad_elements
        assert math.isclose(fast.snapshots[0].sites[name].grad_abs_mean, slow.snapshots[0].sites[name].grad_abs_mean,
                            rel_tol=rtol)  # fmt: skip


@pytest.mark.parametrize("compile", [True, False], ids=["kernel", "torch"])
def test_a_backward_after_the_snapshot_adds_nothing_to_the_next_window(compile: bool) -> None:
    """The sums are kept from window to window (zeroed at each snapshot): the gradient of a forward pass
    read by one snapshot never lands in the next window, whose own passes are counted as usual."""
    batches = _batches(torch.float32, torch.contiguous_format, steps=2)
    model = _model(torch.float32, torch.contiguous_format)
    with deadneuron.Monitor(model, every=None, compile=compile) as mon:
        loss = model(batches[0]).square().mean()
        first = mon.snapshot()
        loss.backward()  # after the snapshot that read its forward pass
        model.grads.clear()
        model(batches[1]).square().mean().backward()
        second = mon.snapshot()
    assert first is not None and second is not None
    assert first.sites["gelu"].grad_elements == 0
    g = model.grads["gelu"][0].numpy()
    elements = g.shape[0] * g.shape[2] * g.shape[3]
    assert second.sites["gelu"].grad_elements == elements
    l1, nonzero = _oracle(g, 1)
    detail = mon.last_channels["gelu"]
    assert detail.grad_nonzero is not None and detail.grad_abs_mean is not None
    np.testing.assert_array_equal(detail.grad_nonzero, nonzero / elements)
    np.testing.assert_allclose(detail.grad_abs_mean, l1 / elements, rtol=1e-12 if compile else 1e-6)


def test_bfloat16_sites_on_the_cpu_are_summed_by_torch() -> None:
    """The kernel reads float32 and float64 only: bfloat16 gradients on the CPU go the torch way, into the
    same accumulators; against numpy over the stored gradients (torch sums bfloat16 rows in float32)."""
    batches = _batches(torch.bfloat16, torch.contiguous_format, steps=2)
    model = _model(torch.bfloat16, torch.contiguous_format)
    mon = _train(model, batches)
    for name, axis in AXES.items():
        g = np.concatenate([np.moveaxis(t.float().numpy(), axis, -1).reshape(-1, t.shape[axis]) for t in model.grads[name]])
        l1, nonzero = _oracle(g, 1)
        detail = mon.last_channels[name]
        assert detail.grad_nonzero is not None and detail.grad_abs_mean is not None
        np.testing.assert_array_equal(detail.grad_nonzero, nonzero / g.shape[0], err_msg=name)
        np.testing.assert_allclose(detail.grad_abs_mean, l1 / g.shape[0], rtol=1e-5, err_msg=name)
