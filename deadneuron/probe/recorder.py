"""Recorder: a context manager that owns every hook it registers and keeps statistics per call site.

A *site* is one place in the forward pass where an activation runs: an activation module at one of its
call places, or a functional activation (``F.relu``, ``torch.tanh``, ``x.relu()``...) found at run time
through a `TorchFunctionMode`. One shared ``self.relu`` after four BatchNorm layers is four sites (four
sets of neurons), named as `deadneuron.probe.site` says (``mlp.act``, ``conv1>relu``; call order where
nothing else tells them apart: `deadneuron.probe.callorder`). Statistics are computed inside the hooks
(never from stored tensors: an in-place ReLU overwrites its input before a later hook could read it) and
stay on the tensor's device; z is read in a forward *pre*-hook where the flat region is tested on it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deadneuron.activations import ActivationSpec, FlatRegion, FlatRegions, check_delta, check_eps, is_inplace
from deadneuron.probe.axisrules import AxisSource
from deadneuron.probe.batched import is_batched, outside_transforms
from deadneuron.probe.callorder import CallOrder
from deadneuron.probe.coverage import Coverage
from deadneuron.probe.experts import experts_warnings, stacked_experts
from deadneuron.probe.functional import FunctionalProbe, first_tensor, tensors
from deadneuron.probe.layout import AxisTracker, OutputLayout, dim_of, fits, output_info, refit
from deadneuron.probe.leaves import hooked_modules, quiet_leaf
from deadneuron.probe.masks import BatchMask
from deadneuron.probe.measure import measure_input, measure_output, writable
from deadneuron.probe.modestack import is_top, on_stack, pop_if_top, remove_mode
from deadneuron.probe.observer import SiteObserver
from deadneuron.probe.placement import StatedDims
from deadneuron.probe.site import Site, shown_name, site_globs
from deadneuron.probe.sitetable import SiteTable
from deadneuron.registry import ActivationRegistry, default_registry
from deadneuron.select import matches
from deadneuron.stats import ChannelStats, Kernels, ValueHistogram
from deadneuron.wrappers import unwrap

# The autograd graph task on this thread (-1 outside backward). A forward pass inside backward is checkpointing
# recomputing a segment (torch.utils.checkpoint), not a batch: every hook ignores it.
_graph_task = torch._C._current_graph_task_id

# An activation module measured: spec, flat region, name, site leaf name, its site key, its module-stack
# entry, and the sites of its calls under way (pushed before the call, popped after it).
_Activation = tuple[ActivationSpec, FlatRegion, str, str, tuple[str], tuple[str, bool], list[Site | None]]


class Recorder(SiteTable):
    """Hooks ``model``, records per-site activation statistics, and removes every hook on exit.

    Use as ``with Recorder(model) as rec: model(x)`` then ``rec.results()``. On exit (also after an
    exception) every hook is removed and each module's train/eval flag is restored. ``compile=True``
    uses the fast statistics kernels (`deadneuron.stats.Kernels`: the C kernel on CPU, else
    `torch.compile`); ``False`` the eager torch reference. ``activations`` adds the user's kinds
    (default: `deadneuron.registry.default_registry`); ``coverage`` says what was not measured.
    A model inside wrappers (DistributedDataParallel, DataParallel, torch.compile) is recorded as the
    module inside them, under its own names (``notes`` says so; see `deadneuron.wrappers`): call the
    DDP wrapper as usual, but a compiled model through ``rec.model`` (hooks cannot run in its graph).
    ``observer`` (see `deadneuron.probe.observer`) sees every site's z and output; with
    ``restore_modes=False`` the train/eval flags are left to the caller (a training loop owns them).
    ``mask_dims``: per site glob, the dims a padding mask lies on (`deadneuron.probe.placement`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 0.0,
        delta: float = 0.05,
        select: Sequence[str] | None = None,
        functional: bool = True,
        compile: bool = True,
        histograms: bool = False,
        channel_axis: Mapping[str, int | None] | None = None,
        mask_dims: Mapping[str, Sequence[int]] | StatedDims | None = None,
        activations: ActivationRegistry | None = None,
        observer: SiteObserver | None = None,
        restore_modes: bool = True,
    ) -> None:
        check_eps(eps)
        check_delta(delta)
        self.model, self.notes = unwrap(model)  # DDP / torch.compile wrappers: their inner module
        self.eps = eps
        self.delta = delta
        self.select = tuple(select) if select else None
        self.functional = functional
        self.kernels = Kernels(compile=compile)
        self.histograms = histograms
        self.axes = AxisTracker(channel_axis)
        self.mask_dims = mask_dims if isinstance(mask_dims, StatedDims) else StatedDims(mask_dims)  # (`placement`)
        self.activations = activations if activations is not None else default_registry
        self.coverage = Coverage()
        self.observer = observer
        self.restore_modes = restore_modes
        self._handles: list[RemovableHandle] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._names: dict[nn.Module, str] = {}
        self._outs: dict[nn.Module, tuple[str, OutputLayout | None, int | None]] = {}  # name, layout, producer code
        self._by_name: dict[str, nn.Module] = {}
        self._specs: dict[nn.Module, _Activation] = {}  # the activation modules measured
        self._sites: dict[tuple[Any, ...], Site] = {}
        self._order = CallOrder()  # occurrence numbers of the calls of one place (`callorder`)
        self._producers: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._stack: list[tuple[str, bool]] = []
        self._mode: FunctionalProbe | None = None
        self._probe: FunctionalProbe | None = None  # kept across re-entries (building one is not free)
        self._suspended: list[bool] = []
        self._region = FlatRegions(delta)  # derived once per distinct activation
        self._last: Site | None = None
        self.fused: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, relu(z)) written by the kernel, for the call
        self.first_input: tuple[int, int | None] | None = None  # the batch's first site: rank, channel dim of z
        self.last_module: str | None = None
        self._mask: BatchMask | None = None
        self.wrapped = False  # the model's next call wraps a whole training step (see `start_batch`)

    # -- context management -----------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self._modes = [(m, m.training) for m in self.model.modules()] if self.restore_modes else []
        try:
            self._register()
            if self.functional:
                if self._probe is None:
                    self._probe = FunctionalProbe(self)
                self._mode = self._probe
                self._mode.__enter__()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._probe is not None:  # a call held by a forward pass that raised (`composite`, `written`)
                self._probe.pending = self._probe._scaled = None
            if self._mode is not None:
                mode, self._mode = self._mode, None
                remove_mode(mode)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            # Pre-order: a parent's train() also sets its children, which their own entries then
            # correct. Only modules whose flag changed are touched (train() is slow on big models).
            for m, training in self._modes:
                if m.training != training:
                    m.train(training)

    def _register(self) -> None:
        named = [(name, m, self.activations.spec_for_module(m)) for name, m in hooked_modules(self.model)]
        for name, m, spec in self.coverage.scan(named):  # TorchScript modules left out: they take no hooks
            self._names[m] = name
            self._by_name[name] = m
            measured = spec is not None and self._module_selected(name, spec)
            self._outs[m] = (name, *output_info(m, keeps_layout=measured))
            if spec is not None and measured:
                leaf = name.rsplit(".", 1)[-1]
                leaf = leaf if leaf and not leaf.isdigit() else spec.kind_name  # an index says less
                self._specs[m] = (spec, self._region(spec), name, leaf, (name,), (name, True), [])
                # its output as its forward returned it, before forward hooks of the model's own change it
                self._hook(m, self._activation_pre_hook, self._activation_hook, first=bool(m._forward_hooks))
                if m is not self.model:
                    continue
            elif m is not self.model and (spec is not None or quiet_leaf(m)):  # incl. a select's left-outs
                self._hook(m, self._leaf_enter_hook, self._leaf_exit_hook)
                continue
            self._hook(m, self._enter_hook, self._exit_hook)  # the model, and every other module

    def _hook(self, m: nn.Module, pre: Callable[..., None], post: Callable[..., None], *, first: bool = False) -> None:
        self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post, prepend=first)]

    def _module_selected(self, name: str, spec: ActivationSpec) -> bool:
        if self.select is None or matches((name, spec.kind_name, f"kind:{spec.kind_name}"), self.select):
            return True
        self.coverage.left_out(name)
        return False

    def start_batch(self, mask: torch.Tensor | BatchMask | None = None, *, wrapped: bool = False) -> None:
        """Forget per-forward bookkeeping (occurrence counters, producers, the module stack) and take the
        batch's padding mask (bool or 0/1, (N, positions...), True where the batch holds data, on the model's
        device; or `BatchMask.of` it; or None): statistics then cover valid positions only, at every site
        it fits (`deadneuron.probe.masks`). ``wrapped``: the model's next call runs a whole training step
        (a trainer reaching its step through the model's forward): only the module calls inside it count."""
        self._mask = self.axes.order.mask = BatchMask.of(mask) if isinstance(mask, torch.Tensor) else mask
        self.wrapped = wrapped
        self._forget_forward()
        self._last, self.last_module, self.first_input = None, None, None

    def _forget_forward(self) -> None:
        self.fused = None
        if self._probe is not None:
            self._probe.pending = self._probe._scaled = None  # a forward pass that raised after a sigmoid call
        self._order.end_forward()
        self._producers.clear()
        self.axes.reset()
        self._stack.clear()
        self._suspended.clear()
        self._ensure_mode()

    # -- the functional probe is suspended inside activation modules and torch's own leaves (each torch call would pass
    # through its Python __torch_function__ for nothing); a module that raises leaves it so until the next forward.
    def _suspend(self) -> bool:
        return self._mode is not None and pop_if_top(self._mode)

    def _resume(self, suspended: bool) -> None:
        if suspended and self._mode is not None:
            torch._C._push_on_torch_function_stack(self._mode)

    def idle(self) -> None:
        """Take the functional probe off the torch-function stack until the next forward pass puts it back,
        so that code between forward passes (a loss, an optimizer step) runs without it (the monitor)."""
        self._settle()
        mode = self._mode
        if mode is not None and on_stack(mode):
            remove_mode(mode)

    def _settle(self) -> None:
        """Measure a call the probe holds (`composite`, `written`) before a hook changes the module stack."""
        if self._probe is not None and self._probe.pending is not None:
            self._probe.settle()

    def _ensure_mode(self) -> None:
        mode = self._mode
        if mode is not None and not on_stack(mode):
            torch._C._push_on_torch_function_stack(mode)

    # -- generic hooks: the module stack and who produced which tensor ----------------------------
    def _enter_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        if _graph_task() != -1:  # recomputed inside backward (checkpointing)
            return
        self._settle()
        if m is self.model and self.wrapped:  # not on the stack: what runs outside the parts is outside the model
            self.wrapped = False
            return
        if m is self.model:
            self._forget_forward()
        elif not self._stack:  # a submodule called on its own: the probe may be idle (see `idle`)
            self._ensure_mode()
        self._stack.append((self._names[m], m in self._specs))

    def _exit_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if _graph_task() != -1:  # recomputed inside backward (checkpointing)
            return
        self._settle()
        if self._stack:
            self._stack.pop()
        self._note_output(m, args, out)
        if m in self.coverage.suspects:
            self.coverage.saw(m, args, out)
        if not self._stack and m is not self.model:  # a part called on its own returned: no module runs now
            self.idle()

    def _leaf_enter_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        if _graph_task() == -1:  # not recomputed inside backward (checkpointing)
            self._settle()
            self._suspended.append(self._suspend())

    def _leaf_exit_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """A quiet leaf (see `quiet_leaf`) is never on the stack: only what it produced is noted."""
        if _graph_task() != -1:  # recomputed inside backward (checkpointing)
            return
        suspended = self._suspended.pop() if self._suspended else False
        # the probe not back yet: its tensor calls stay in C (no DisableTorchFunction if it was the only mode)
        self._note_output(m, args, out, quiet=suspended and not torch._C._len_torch_function_stack())
        self._resume(suspended)

    def _note_output(self, m: nn.Module, args: tuple[Any, ...], out: Any, *, quiet: bool = False) -> None:
        """Remember which module produced each output tensor (for site names) and its channel axis.
        ``quiet``: no torch-function mode is active (tensor calls need not turn the handling off).
        Hooks run after every module, so this is kept short: one lookup, one weak reference."""
        name, layout, code = self._outs[m]
        self.last_module = name
        if m in self.coverage.watched:
            self.coverage.ran.add(name)
        self.axes.order.carry_module(args, out)  # the positions' order through what the probe did not see
        if type(out) is torch.Tensor:
            ref = weakref.ref(out)
            self._producers[id(out)] = (ref, name)
            if code is not None:  # a producer: its type fixes the axis
                if quiet:
                    self.axes.produced(out, ref, code)
                else:
                    with torch._C.DisableTorchFunction():
                        self.axes.produced(out, ref, code)
                return
        else:
            for t in tensors(out):
                self._producers[id(t)] = (weakref.ref(t), name)
        if layout is not None:  # else the module's type says nothing of its output's axis
            with torch._C.DisableTorchFunction():
                self.axes.layout_output(layout, m, args, out)

    def _producer_of(self, z: torch.Tensor) -> str | None:
        entry = self._producers.get(id(z))
        return entry[1] if entry is not None and entry[0]() is z else None

    # -- activation module hooks (they also do what _enter_hook/_exit_hook do for other modules) ------
    # They run with __torch_function__ handling off (each tensor method they call would otherwise pass
    # through the probe, a Python call each); the probe is put back once the output is measured and noted.
    def _activation_pre_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        if _graph_task() != -1:  # recomputed inside backward (checkpointing)
            return
        self._settle()
        spec, region, name, leaf, key, entry, pending = self._specs[m]
        z = args[0] if args and isinstance(args[0], torch.Tensor) else None
        site = out = None
        with torch._C.DisableTorchFunction():
            if z is not None and self.coverage.readable(name, m, z):
                site = self._site(key, name, leaf, False, spec, region, z)
                relu = type(m) is nn.ReLU  # the probe stays on to answer its F.relu call with the values written
                out = self._before(site, z, is_inplace(m), relu=relu, write=relu and writable(z) and self._mode is not None and is_top(self._mode))
        pending.append(site)
        self._stack.append(entry)
        self.fused = None if out is None else (z, out)  # type: ignore[assignment]
        self._suspended.append(False if out is not None else self._suspend())

    def _activation_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if _graph_task() != -1:  # recomputed inside backward (checkpointing)
            return
        suspended = self._suspended.pop() if self._suspended else False
        pending = self._specs[m][-1]
        site = pending.pop() if pending else None
        self.fused = None  # answered, or never asked for (a hook of the model's own changed the input)
        with torch._C.DisableTorchFunction():
            if site is not None and isinstance(out, torch.Tensor):
                self._after(site, out, None if is_inplace(m) else first_tensor(args, None))
            if m is not self.model:
                if self._stack:
                    self._stack.pop()
                self._note_output(m, args, out, quiet=True)
        self._resume(suspended)

    # -- sites ----------------------------------------------------------------------------------
    def _functional_site(self, spec: ActivationSpec, fname: str, z: torch.Tensor) -> Site | None:
        owner = self._stack[-1][0] if self._stack else ""
        if self.select is not None and not matches((owner, fname, f"kind:{spec.kind_name}"), self.select):
            producer = self._producer_of(z)
            self.coverage.left_out(f"{producer}>{fname}" if producer else f"{owner}.{fname}".lstrip("."))
            return None
        return self._site(("F", fname, owner), owner, fname, True, spec, self._region(spec, in_hook=True), z)

    def _site(self, owner_key: tuple[Any, ...], owner: str, leaf: str, functional: bool, spec: ActivationSpec,
              region: FlatRegion, z: torch.Tensor) -> Site:  # fmt: skip
        producer = self._producer_of(z)
        count_key = (*owner_key, producer := None if producer == owner else producer)
        key = (*count_key, self._order.next(count_key))
        site = self._sites.get(key)
        if site is None:
            axis, axis_source = self.axes.axis_of(z, names := site_globs(self._sites.values(), owner, leaf, producer, functional))
            z = z.unsqueeze(-1) if axis_source is AxisSource.NONE else z  # no channel dim: as `Site.view` reads it
            channels = z.shape[axis] if z.dim() else 1
            with outside_transforms():  # its accumulators made as plain tensors inside torch.func.grad too
                site = Site(owner, leaf, functional, producer, key[-1], spec, region, axis, axis_source,
                            ChannelStats(channels, z.device, kernels=self.kernels), tuple(z.shape),
                            histogram=ValueHistogram(z.device) if self.histograms else None)  # fmt: skip
            site.placement.site, (site.placement.stated, site.placement.implied) = names[0], self.mask_dims.of(
                names, tuple(z.shape), axis)
            site.rank, site.names, self._sites[key] = z.dim(), names, site
            site.experts = stacked_experts(owner, self._by_name, channels)
        elif (z := site.view(z)).dim() != site.rank or not fits(z, site.axis, site.stats.channels):  # a mismatch
            refit(self.axes, site, z, shown_name(self._sites.values(), site))
        site.calls += 1
        if self._last is None:  # the batch's first site (`deadneuron._inputs.unbatched`)
            self.first_input = (z.dim(), dim_of(z.dim(), site.axis))
        self._last = site
        return site

    # Statistics run with __torch_function__ handling off: our own ops must not pass through the
    # functional probe (that would cost a Python call per op, and is never what it looks for).
    def _before(self, site: Site, z: torch.Tensor, inplace: bool, *, relu: bool = False, write: bool = False) -> torch.Tensor | None:
        """``relu``: the call computes exactly ``torch.relu(z)``; ``write``: the caller can answer it with relu's
        values (`writable`), returned where the statistics pass wrote them (`measure_input`)."""
        write, view = write and not inplace and not site.single, site.view(z)  # (values shaped as z only)
        out = measure_input(site, view, inplace=inplace, mask=self._mask, eps=self.eps, relu=relu, write=write, order=self.axes.order)
        if self.observer is not None and not is_batched(z):  # after: the call's mask is decided (`site.call_mask`)
            self.observer.before(site, z)
        return out

    def _after(self, site: Site, a: torch.Tensor, z: torch.Tensor | None) -> None:
        a, z = site.view(a), z if z is None else site.view(z)
        measure_output(site, a, z, eps=self.eps, mask=self._mask)
        if self.observer is not None and not is_batched(a):  # (not inside torch.func.vmap: `batched`)
            self.observer.after(site, a)

    # -- results -----------------------------------------------------------------------------------
    def warnings(self) -> list[str]:
        """Unknown activations no site measured (`coverage`), mask placements guessed or refused (`order`)."""
        return [*self.coverage.warnings(self._sites.values(), self.select), *self.mask_dims.warnings(self.named_sites()),
                *self._order.warnings(self.keyed_sites()), *experts_warnings(self.named_sites())]
