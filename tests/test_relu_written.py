"""Where an audit measures an exact ReLU that returns a new tensor (``nn.ReLU()``, ``F.relu``, ``torch.relu``,
``x.relu()``) under inference, the C kernel's statistics pass also writes relu's values, and the model's relu
call is answered with them: one pass over z where the model's relu and the statistics made two.

What must hold is that the model cannot tell: every output is torch.relu's bit for bit (NaN payloads, -0.0,
+-Inf), laid out as torch.relu lays it out, with the same autograd state; relu calls the audit cannot answer
(in place, a graph being recorded, other thresholds, a padding mask, other dtypes) run as before; and the
statistics stay numpy's over the z the model stored itself. The oracle is the same model's plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from deadneuron.probe.recorder import Recorder
from deadneuron.stats import ChannelStats
from tests.test_native import needs_native


class Relus(nn.Module):
    """conv -> relu by module, F.relu, torch.relu, x.relu() on z laid out by ``layout``; stores each z."""

    def __init__(self, layout: str, *, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.layout, self.seen = layout, []  # type: list[np.ndarray]

    def _z(self, x: torch.Tensor, k: int) -> torch.Tensor:
        z = self.conv(x) * (k + 1.0)
        z.view(-1)[::13] = -0.0
        z.view(-1)[5], z.view(-1)[8], z.view(-1)[11] = float("nan"), -float("inf"), float("inf")
        if self.layout == "channels_last":
            z = z.contiguous(memory_format=torch.channels_last)
        elif self.layout == "tokens":
            z = z.flatten(2).transpose(1, 2).contiguous()  # (N, L, C)
        self.seen.append(z.detach().float().numpy().copy())
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self._z(x, 0))
        b = F.relu(self._z(x, 1))
        c = torch.relu(self._z(x, 2))
        d = self._z(x, 3).relu()
        return torch.stack([a, b, c, d])


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 24, 24, generator=g) for _ in range(n)]  # z of 73,728 elements: written


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[t.dtype])


def _written(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The tensors the kernel wrote relu's values into (`update_relu_along` with an ``out`` that it filled)."""
    written: list[torch.Tensor] = []
    real = ChannelStats.update_relu_along

    def spy(self: ChannelStats, z: torch.Tensor, *args: object, **kwargs: object) -> bool:
        done = real(self, z, *args, **kwargs)  # type: ignore[arg-type]
        out = kwargs.get("out", args[3] if len(args) > 3 else None)
        if done and out is not None:
            written.append(out)  # type: ignore[arg-type]
        return done

    monkeypatch.setattr(ChannelStats, "update_relu_along", spy)
    return written


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_are_torch_relu_bit_for_bit(layout: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Relus(layout).to(dtype).eval()
    batches = [b.to(dtype) for b in _batches()]
    with torch.inference_mode():
        want = [model(b) for b in batches]
    outputs: list[torch.Tensor] = []
    inner: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.register_forward_hook(lambda m, a, o: outputs.append(o.clone()))
    model.act.register_forward_hook(lambda m, a, o: inner.append((a[0], o)))
    deadneuron.audit(model, batches, progress=False, rules=False)
    assert len(outputs) == len(want)
    for got, exp in zip(outputs, want, strict=True):
        assert got.dtype == exp.dtype and got.stride() == exp.stride()
        assert torch.equal(_bits(got), _bits(exp))  # NaN payloads and -0.0 too
    for z, a in inner:  # the module's own output: torch.relu's layout, a new tensor
        assert a.stride() == torch.relu(z).stride() and a.data_ptr() != z.data_ptr()
        assert not a.requires_grad and a.grad_fn is None


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
def test_relu_calls_are_answered_by_the_statistics_pass(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every relu result the model got (all four ways of calling it) is a tensor the kernel wrote."""
    model = Relus(layout).eval()
    written = _written(monkeypatch)
    got: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, o: got.append(o))
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda ts, *a, **k: (got.extend(ts[1:]), stack(ts, *a, **k))[1])
    report = deadneuron.audit(model, _batches(), progress=False, rules=False)
    assert len(got) == 4 * 3 and len(written) == 4 * 3
    assert {id(t) for t in got} == {id(t) for t in written}
    _check_statistics(report, model.seen, layout)


def _check_statistics(report: deadneuron.Report, seen: list[np.ndarray], layout: str) -> None:
    """Per site (the four calls, in order), numpy's figures over the z the model stored."""
    axis = 2 if layout == "tokens" else 1
    sites = list(report.sites.values())
    assert len(sites) == 4
    for k, site in enumerate(sites):
        zs = seen[k::4]
        z = np.concatenate([np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) for t in zs]).astype(np.float64)
        with np.errstate(invalid="ignore"):
            a = np.where(z < 0, 0.0, z)  # torch.relu: -inf -> 0, NaN stays NaN
        fin = np.isfinite(a)
        am = np.where(fin, a, np.nan)
        assert site.channel_axis == axis and site.n == z.shape[0]
        np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), (np.abs(a) <= 0).sum(0))
        np.testing.assert_array_equal(np.round(np.array(site.channel_flat) * site.n), (np.isfinite(z) & (z <= 0)).sum(0))
        np.testing.assert_array_equal(site.channel_nonfinite, (~fin).sum(0))
        np.testing.assert_allclose(site.channel_mean, np.nanmean(am, 0), rtol=1e-9)
        np.testing.assert_allclose(site.channel_max, np.nanmax(am, 0), rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "tokens"])
def test_statistics_match_numpy_on_the_z_the_model_stored(layout: str) -> None:
    model = Relus(layout).eval()
    report = deadneuron.audit(model, _batches(), progress=False, rules=False)
    _check_statistics(report, model.seen, layout)


@needs_native
def test_relu_calls_it_cannot_answer_run_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under another eps (relu's values are written under its default thresholds only), in place, in
    bfloat16: torch's relu runs, and the outputs are still the plain forward's."""
    written = _written(monkeypatch)
    for model, kwargs in ((Relus("tokens"), {"eps": 1e-6}), (Relus("tokens", inplace=True), {}),
                          (Relus("tokens").to(torch.bfloat16), {})):  # fmt: skip
        model.eval()
        batches = [b.to(model.conv.weight.dtype) for b in _batches()]
        with torch.inference_mode():
            want = [model(b) for b in batches]
        outputs: list[torch.Tensor] = []
        model.register_forward_hook(lambda m, a, o, kept=outputs: kept.append(o.clone()))
        deadneuron.audit(model, batches, progress=False, rules=False, **kwargs)  # type: ignore[arg-type]
        assert all(torch.equal(_bits(g), _bits(w)) for g, w in zip(outputs, want, strict=True))
    assert len(written) == 3 * 3  # the in-place model's three calls that return a new tensor, only


def test_a_recorded_graph_gets_torch_relu_and_its_gradients() -> None:
    """Under autograd (a monitor's training step) relu's output must carry its grad_fn: not answered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16384, 4)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with Recorder(model, restore_modes=False) as rec:
        rec.start_batch(None)
        out = model(x)
        assert out.grad_fn is not None
        out.sum().backward()
    for p, w in zip(model.parameters(), want, strict=True):
        assert torch.equal(p.grad, w)  # type: ignore[arg-type]


def test_a_pre_hook_that_replaces_the_input_still_gets_relu_of_it() -> None:
    """The model's own pre-hook on the ReLU hands forward another tensor than the one measured: the
    forward's relu is of the tensor it was given."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    model[1].register_forward_pre_hook(lambda m, a: (a[0] - 1.0,))
    x = torch.randn(8192, 4)
    with torch.inference_mode():
        want = model(x)
    got: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, a, o: got.append(o.clone()))
    deadneuron.audit(model, [x], progress=False, rules=False)
    assert torch.equal(got[0], want)


def test_the_probe_is_off_the_stack_after_the_audit() -> None:
    model = Relus("contiguous").eval()
    before = torch._C._len_torch_function_stack()
    deadneuron.audit(model, _batches(1), progress=False, rules=False)
    assert torch._C._len_torch_function_stack() == before
    with torch.inference_mode():
        out = model(_batches(1)[0])
    assert out.shape[0] == 4


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "tokens"])
def test_batches_split_over_threads_are_written_whole(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches large enough to be split over two threads (by channels; channels-last rows too narrow to
    share, by stretches of rows): every element written, torch.relu's bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()).eval()
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        elif layout == "tokens":
            model = nn.Sequential(nn.Linear(3, 64), nn.ReLU()).eval()
        g = torch.Generator().manual_seed(2)
        batches = [torch.randn(8, 3, 32, 32, generator=g) if layout != "tokens" else torch.randn(8, 1024, 3, generator=g)]
        if layout == "channels_last":
            batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        with torch.inference_mode():
            want = [model(b) for b in batches]
        got: list[torch.Tensor] = []
        model.register_forward_hook(lambda m, a, o: got.append(o.clone()))
        written = _written(monkeypatch)
        deadneuron.audit(model, batches, progress=False, rules=False)
        assert want[0].numel() >= 1 << 16 and len(written) == 1
        assert got[0].stride() == want[0].stride() and torch.equal(_bits(got[0]), _bits(want[0]))
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_a_batch_read_a_block_of_columns_at_a_time_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels-last batches too large for the tiled pass, of more channels than one block of columns, are
    read a block at a time down their rows: there the kernel declines to write (torch's relu was faster),
    the statistics are taken from z as before and the model's relu runs, once per layout asked."""
    model = nn.Sequential(nn.Linear(8, 96), nn.ReLU()).eval()
    batch = torch.randn(16, 3136, 8)
    with torch.inference_mode():
        want = model(batch)
    written = _written(monkeypatch)
    got: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, a, o: got.append(o.clone()))
    report = deadneuron.audit(model, [batch, batch], progress=False, rules=False)
    assert written == [] and torch.equal(_bits(got[0]), _bits(want))
    (site,) = report.sites.values()
    z = model[0](batch).detach().reshape(-1, 96).numpy()  # what the model's own Linear gives
    assert site.n == 2 * z.shape[0]
    np.testing.assert_array_equal(np.round(np.array(site.channel_zero) * site.n), 2 * (z <= 0).sum(0))


@needs_native
def test_small_relu_calls_are_not_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under 2**16 elements, answering a call costs more Python than the relu it saves: torch's relu runs."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    written = _written(monkeypatch)
    report = deadneuron.audit(model, [torch.randn(64, 4)], progress=False, rules=False)
    assert written == [] and report.sites
