"""Gradient flow and activation magnitude per channel, measured inside the hooks (DESIGN section 9).

`FlowObserver` is the `deadneuron.probe.observer.SiteObserver` the training monitor hands the Recorder.
At every site call it

* registers a tensor hook on the pre-activation ``z`` (when ``z.requires_grad``). The hook reads
  ``dL/dz`` in the backward pass and returns None, so autograd computes exactly what it would have
  computed without it. Per channel it adds the count of non-zero gradient elements and the sum of
  ``|dL/dz|``. A hook registered on ``z`` before an in-place activation overwrites it still receives the
  gradient with respect to the pre-activation.
* adds ``sum |a|`` per channel of the output, for the tau-dormant score, at kinds whose output can be
  negative. Where the output is never negative (ReLU, ReLU6, Sigmoid, Hardsigmoid, Softplus), mean
  ``|a|`` is the mean the Recorder already keeps, so no pass is spent on it.

On the CPU, for float32 and float64 tensors, both sums are one pass of the C kernel
(`deadneuron._native.NativeStats.flow_plan`: sum ``|x|`` and the count of ``x != 0`` per channel in
float64, read in place, the call prepared once per layout), where the site's statistics kernels have it
(not with ``compile=False``); elsewhere (CUDA, float16/bfloat16, no compiler) torch computes them.
Everything stays on the tensor's device; at a snapshot the sums of every site go to the host with the
rest of the window's statistics in one copy (`flow_rows`, `flow_hosts`: a row that processes can add up).
`tau_scores` is the pure part: Sokar et al. 2023's score of each unit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deadneuron.probe.masks import BatchMask, masked_channel_view, masked_rows
from deadneuron.probe.measure import place_of
from deadneuron.probe.placement import Placement
from deadneuron.probe.site import Site
from deadneuron.stats import channel_view

if TYPE_CHECKING:
    from deadneuron._native import NativeStats, Planned

# Kinds whose output is >= 0 everywhere: mean |a| is the plain mean of a.
NONNEGATIVE_KINDS = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softplus"})
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NATIVE_DTYPES = (torch.float32, torch.float64)
_MAX_PLANS = 16  # prepared calls kept per site (layouts that keep changing: varying shapes)


def _channel_sums(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of an (outer, C, inner) view: (sum |x|, count of x != 0), float64, one scratch tensor.
    Inner dims are reduced first (faster for NCHW); NaN elements make both sums NaN (as the C kernel's:
    ``sign`` maps NaN to 0, so the count is set to NaN where the sum of |x| is)."""
    a = x3.abs() if x3.dtype not in _LOW_PRECISION else x3.float().abs()
    l1 = a.sum(2).sum(0, dtype=torch.float64)
    nonzero = a.sign_().sum(2).sum(0, dtype=torch.float64)
    return l1, nonzero.masked_fill_(l1.isnan(), math.nan)


class SiteFlow:
    """Running per-channel sums of one site, on the site's device. ``native``: the C kernel, for a site on
    the CPU (None: torch for everything); it sums the float32/float64 tensors."""

    def __init__(self, axis: int, channels: int, *, track_abs: bool, native: NativeStats | None = None) -> None:
        self.axis = axis
        self.channels = channels
        self.track_abs = track_abs
        self.native = native
        self._plans: dict[tuple[Any, ...], Planned] = {}
        self.abs_sum: torch.Tensor | None = None  # sum |a| per channel
        self.abs_elements = 0
        self.grad_abs: torch.Tensor | None = None  # sum |dL/dz| per channel
        self.grad_nonzero: torch.Tensor | None = None  # count of dL/dz != 0 per channel
        self.grad_elements = 0  # gradient elements seen per channel
        self.window = 0  # `restart` counts the windows: a gradient hook adds only into its own window's sums
        self._acc: torch.Tensor | None = None
        if native is not None:  # the kernel's accumulators, on the CPU, kept (and zeroed) from window to window
            self._acc = torch.zeros(3, channels, dtype=torch.float64)
            self.abs_sum, self.grad_abs, self.grad_nonzero = self._acc.unbind(0)

    def restart(self) -> None:
        """A new window: every sum from zero. The C kernel's accumulators are zeroed in place (the prepared
        calls stay valid); a gradient hook of an earlier window's forward pass no longer adds anything."""
        self.window += 1
        self.abs_elements = self.grad_elements = 0
        if self._acc is not None:
            self._acc.zero_()
        else:
            self.abs_sum = self.grad_abs = self.grad_nonzero = None

    def add_output(self, a: torch.Tensor, mask: BatchMask | None = None, place: Placement | None = None) -> None:
        """Sum |a| per channel, over the valid positions of ``mask`` where it lies at ``place`` (None: it
        does not fit)."""
        native = self._native_for(a)
        if native is not None and self.abs_sum is not None:
            self.abs_elements += self._native_sums(native, a.detach(), mask, place, self.abs_sum, None)
            return
        with torch.no_grad():
            a3 = masked_channel_view(a.detach(), self.axis, mask, place)[0]
            a = a3.abs() if a3.dtype not in _LOW_PRECISION else a3.float().abs()
            part = a.sum(2).sum(0, dtype=torch.float64)
        self.abs_sum = part if self.abs_sum is None else self.abs_sum.add_(part)
        self.abs_elements += a3.shape[0] * a3.shape[2]

    def add_grad(self, grad: torch.Tensor, mask: BatchMask | None = None, *, place: Placement | None = None,
                 window: int | None = None) -> None:  # fmt: skip
        """The tensor hook on z: reads the gradient, returns None (the gradient flows on unchanged). With
        the forward pass's padding ``mask`` (lying at ``place``), only valid positions count; ``window``: the
        window of the forward pass (its gradient is not added to a later window's sums)."""
        if window is not None and window != self.window:
            return
        with torch._C.DisableTorchFunction():  # no op here passes through a functional probe
            native = self._native_for(grad)
            if native is not None and self.grad_abs is not None and self.grad_nonzero is not None:
                self.grad_elements += self._native_sums(native, grad.detach(), mask, place, self.grad_abs,
                                                        self.grad_nonzero)  # fmt: skip
                return
            self._torch_grad(grad, mask, place)

    def _torch_grad(self, grad: torch.Tensor, mask: BatchMask | None, place: Placement | None) -> None:
        """`add_grad` in torch (CUDA, float16/bfloat16, no C kernel)."""
        with torch.no_grad():
            g3 = masked_channel_view(grad.detach(), self.axis, mask, place)[0]
            l1, nonzero = _channel_sums(g3)
            if self.grad_abs is None or self.grad_nonzero is None:
                self.grad_abs, self.grad_nonzero = l1, nonzero
            else:
                self.grad_abs.add_(l1)
                self.grad_nonzero.add_(nonzero)
            self.grad_elements += g3.shape[0] * g3.shape[2]

    def _native_for(self, x: torch.Tensor) -> NativeStats | None:
        """The C kernel where it sums ``x`` (a non-empty plain CPU float32/float64 tensor), else None."""
        takes = type(x) is torch.Tensor and x.is_cpu and x.dtype in _NATIVE_DTYPES and x.numel() > 0
        return self.native if takes else None

    def _native_sums(self, native: NativeStats, x: torch.Tensor, mask: BatchMask | None, place: Placement | None,
                     abs_sum: torch.Tensor, nonzero: torch.Tensor | None) -> int:  # fmt: skip
        """Add per channel sum |x| into ``abs_sum`` and the count of x != 0 into ``nonzero`` (None: not
        counted) with the C kernel, over the valid positions of ``mask``; the elements per channel added.
        The whole tensor, or a padding mask's valid rows of tokens (N, L, C), is read in place with a call
        prepared once per layout; a masked conv map (N, C, H, W) is gathered first, as the torch path does."""
        if mask is None or mask.index is None or place is None:
            key: tuple[Any, ...] = (x.shape, x.stride(), x.dtype, nonzero is None)
            run = self._plans.get(key)
            if run is None:
                x3 = channel_view(x, self.axis)
                if x3.data_ptr() != x.data_ptr():  # reshaping copied it: sum the copy
                    return _once(native, x3, abs_sum, nonzero)
                run = self._plan(native, key, x3, abs_sum, nonzero)
            run(x.data_ptr(), None)
            return x.numel() // self.channels
        found = masked_rows(x, self.axis, mask, place)
        if found is None or found[0].data_ptr() != x.data_ptr():
            return _once(native, masked_channel_view(x, self.axis, mask, place)[0], abs_sum, nonzero)
        x3, index, _ = found
        key = (x3.shape, x3.stride(), x.dtype, nonzero is None, "rows")
        run = self._plans.get(key) or self._plan(native, key, x3, abs_sum, nonzero)
        run.rows(x.data_ptr(), None, (index.to(torch.int64) * x3.stride(0)).contiguous())
        return int(index.shape[0]) * x3.shape[2]

    def _plan(self, native: NativeStats, key: tuple[Any, ...], x3: torch.Tensor, abs_sum: torch.Tensor,
              nonzero: torch.Tensor | None) -> Planned:  # fmt: skip
        """The call for tensors laid out as ``x3``, kept under ``key`` (a few layouts per site)."""
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        run = self._plans[key] = native.flow_plan(x3, abs_sum, nonzero)
        return run


def _once(native: NativeStats, x3: torch.Tensor, abs_sum: torch.Tensor, nonzero: torch.Tensor | None) -> int:
    """The C kernel's sums of one (outer, C, inner) view (a copy: nothing to prepare for); its elements per channel."""
    native.flow_plan(x3, abs_sum, nonzero)(x3.data_ptr(), None)
    return x3.shape[0] * x3.shape[2]


class FlowObserver:
    """The monitor's `SiteObserver`: one `SiteFlow` per site of one Recorder."""

    def __init__(self, *, gradients: bool = True) -> None:
        self.gradients = gradients
        self.mask: BatchMask | None = None  # the current batch's padding mask (the Recorder's too)
        self._flows: dict[int, SiteFlow] = {}  # id(site): a Recorder keeps its sites alive

    def _flow(self, site: Site) -> SiteFlow:
        flow = self._flows.get(id(site))
        if flow is None:
            track = site.spec.kind_name not in NONNEGATIVE_KINDS
            native = site.stats.kernels.native if site.stats.device.type == "cpu" else None
            flow = self._flows[id(site)] = SiteFlow(site.axis, site.stats.channels, track_abs=track, native=native)
        return flow

    def before(self, site: Site, z: torch.Tensor) -> None:
        """``z`` as the model has it (a hook on the unit-dim view of a site with no channel dim would never run)."""
        if self.gradients and z.requires_grad and torch.is_grad_enabled():
            flow, mask = self._flow(site), self._mask(site)
            place = place_of(site, site.view(z), mask)[0]  # the site's placement (`deadneuron.probe.placement`)
            add = functools.partial(flow.add_grad, mask=mask, place=place, window=flow.window)
            z.register_hook((lambda g: add(g.unsqueeze(-1))) if site.single else add)

    def after(self, site: Site, a: torch.Tensor) -> None:
        flow = self._flow(site)
        if flow.track_abs:
            mask = self._mask(site)
            flow.add_output(a, mask, place_of(site, a, mask)[0])

    def _mask(self, site: Site) -> BatchMask | None:
        """The mask of this call: the batch's, or the one the Recorder measured it under where the site's
        positions were reordered (`deadneuron.probe.order`)."""
        return site.call_mask if site.reordering else self.mask

    def flow_of(self, site: Site) -> SiteFlow | None:
        return self._flows.get(id(site))

    def reset(self) -> None:
        """Start every sum afresh (the monitor's next window). A gradient hook of a forward pass whose
        backward has not run yet adds nothing (its window was read)."""
        for flow in self._flows.values():
            flow.restart()


@dataclass(frozen=True)
class FlowHost:
    """One site's sums as host arrays (per channel); None where nothing was measured."""

    abs_mean: np.ndarray | None  # mean |a| (None: the kind's output is never negative; use the mean of a)
    grad_elements: int
    grad_nonzero: np.ndarray | None  # share of elements with dL/dz != 0
    grad_abs_mean: np.ndarray | None  # mean |dL/dz|


def flow_rows(flows: Sequence[SiteFlow | None], channels: Sequence[int], device: torch.device) -> torch.Tensor:
    """Every site's sums as one float64 row on ``device``, the layout `flow_hosts` reads: per site sum |a|,
    sum |dL/dz| and the count of dL/dz != 0 per channel (zeros where not measured, all zeros for no flow),
    then, after every site, the element counts of |a| and of dL/dz per site. Rows of several processes
    add up to the row of all their data."""
    zeros = torch.zeros(max(channels, default=0), dtype=torch.float64, device=device)
    parts, counts = [], []
    for flow, c in zip(flows, channels, strict=True):
        sums = (flow.abs_sum, flow.grad_abs, flow.grad_nonzero) if flow is not None else (None, None, None)
        parts += [t.to(device) if t is not None else zeros[:c] for t in sums]
        counts += [flow.abs_elements, flow.grad_elements] if flow is not None else [0, 0]
    return torch.cat([*parts, torch.tensor(counts, dtype=torch.float64, device=device)])


def flow_hosts(host: np.ndarray, channels: Sequence[int], kinds: Sequence[str]) -> list[FlowHost]:
    """The row of `flow_rows` (on the host) as per-site figures; ``kinds`` say where |a| is summed (where
    the output can be negative; elsewhere the mean of a is mean |a|)."""
    counts = np.rint(host[3 * sum(channels) :]).astype(np.int64).reshape(-1, 2)
    out, at = [], 0
    for c, kind, (abs_n, grad_n) in zip(channels, kinds, counts.tolist(), strict=True):
        abs_sum, grad_abs, nonzero = (host[at + i * c : at + (i + 1) * c] for i in range(3))
        at += 3 * c
        abs_mean = abs_sum / abs_n if abs_n and kind not in NONNEGATIVE_KINDS else None
        if not grad_n:
            out.append(FlowHost(abs_mean, 0, None, None))
        else:
            out.append(FlowHost(abs_mean, grad_n, nonzero / grad_n, grad_abs / grad_n))
    return out


def tau_scores(abs_mean: np.ndarray) -> np.ndarray:
    """Sokar et al. 2023 (ReDo): each unit's mean |activation| over the layer's mean of those means.

    A layer whose units are all silent scores 0 everywhere; a non-finite mean (NaN/Inf activations)
    makes every score NaN, so no unit is called dormant on figures that mean nothing."""
    if abs_mean.size == 0:
        return abs_mean.astype(np.float64)
    layer = float(abs_mean.sum()) / abs_mean.size  # the mean (numpy's, without its per-call overhead)
    if not math.isfinite(layer):
        return np.full(abs_mean.shape, np.nan)
    if layer == 0.0:
        return np.zeros(abs_mean.shape)
    return abs_mean / layer


def tau_dormant(scores: np.ndarray, tau: float) -> tuple[int, ...]:
    """Units whose score is at most ``tau`` (NaN scores never are)."""
    with np.errstate(invalid="ignore"):
        return tuple(int(i) for i in np.flatnonzero(scores <= tau))
