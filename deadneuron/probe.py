"""Recorder: a context manager that owns every hook it registers and keeps statistics per call site.

A *site* is one place in the forward pass where an activation runs: an activation module at one of its
call places, or a functional activation (``F.relu``, ``torch.tanh``, ``x.relu()``...) found at run time
through a `TorchFunctionMode`. The seed's encoder applies one shared ``self.relu`` after four BatchNorm
layers: that is four sites, because they are four different sets of neurons.

Naming (stable across batches):

* an activation module with a single call site keeps its qualified name (``mlp.act``);
* a reused module is named after the module whose output it consumed: ``encoder.bn_layers.2>relu``
  (after the ``>`` its attribute name, or its kind where that name is a Sequential index);
* a functional activation is named the same way after its producer: ``conv1>relu``; if its input was
  not a module output, after the module inside whose forward it ran: ``block.relu``;
* names still shared by several sites get ``#k`` in call order within the forward pass (0-based).

Statistics are computed inside the hooks (never from stored tensors: an in-place ReLU overwrites both
its input and the conv/BN output before any later hook could read them) and stay on the tensor's
device. The pre-activation z is read in a forward *pre*-hook where the flat region must be tested on z.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from deadneuron.activations import (
    ActivationSpec,
    FlatRegion,
    FunctionalActivations,
    flat_region,
    is_inplace,
    spec_for_module,
)
from deadneuron.select import matches
from deadneuron.stats import ChannelStats, ChannelSummary, Kernels, ValueHistogram, channel_view

_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)
_CHANNEL_LAST = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)


# torch.nn leaves that never call an activation: no functional activation can run inside them, so
# they stay off the module stack and the functional probe is suspended while they run (their hooks
# only note what they produced). Only with torch's own forward: a subclass that overrides it may
# call anything.
_QUIET = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Linear,
    nn.Bilinear,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Embedding,
    nn.Upsample,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack wherever it is (modes above it stay)."""
    above = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def _quiet_leaf(m: nn.Module) -> bool:
    return (
        isinstance(m, _QUIET)
        and not m._modules
        and getattr(type(m).forward, "__module__", "").startswith("torch.nn.modules.")
    )


def channel_axis(x: torch.Tensor, producer: nn.Module | None) -> int:
    """Channel dimension: 1 for conv-like (N, C, ...), the last for (N, ..., C) tensors."""
    if x.dim() <= 2:
        return x.dim() - 1 if x.dim() else 0
    if isinstance(producer, _CHANNEL_FIRST):
        return 1
    if isinstance(producer, _CHANNEL_LAST):
        return x.dim() - 1
    return 1 if x.dim() >= 4 else x.dim() - 1


@dataclass
class _Site:
    owner: str  # activation module's qualified name, or the enclosing module for a functional call
    leaf: str  # "relu" (module attribute name) or the function name
    functional: bool
    producer: str | None
    occurrence: int
    spec: ActivationSpec
    region: FlatRegion
    axis: int
    stats: ChannelStats
    shape: tuple[int, ...] = ()
    calls: int = 0
    histogram: ValueHistogram | None = None

    def flat_from_z_first(self, inplace: bool) -> bool:
        """The flat region must be tested on z before the call: it lives on z and the call
        overwrites z, or it is per channel (PReLU) and needs its own kernel."""
        return not self.region.on_output and (inplace or isinstance(self.region.lo, torch.Tensor))

    @property
    def base_name(self) -> str:
        if self.producer is not None:
            return f"{self.producer}>{self.leaf}"
        if self.functional:
            return f"{self.owner}.{self.leaf}" if self.owner else self.leaf
        return self.owner


@dataclass(frozen=True)
class SiteResult:
    """What the Recorder measured at one site (host values)."""

    name: str
    module: str
    producer: str | None
    functional: bool
    kind: str
    label: str
    channel_axis: int
    flat_region: str
    example_shape: tuple[int, ...]
    calls: int
    summary: ChannelSummary
    histogram: tuple[int, ...] | None = None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if kwargs and isinstance(kwargs.get("input"), torch.Tensor):
        return kwargs["input"]
    return None


class _FunctionalProbe(TorchFunctionMode):
    """Finds functional activation calls made inside the model's forward."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder
        self._lookup = FunctionalActivations()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        rec = self._recorder
        if not rec._stack or rec._stack[-1][1]:
            return func(*args, **kwargs)
        try:
            spec = self._lookup.spec(func, args, kwargs)
        except TypeError:  # an unhashable callable: not one of ours
            spec = None
        z = _first_tensor(args, kwargs)
        if spec is None or z is None or not z.is_floating_point():
            return func(*args, **kwargs)
        site = rec._functional_site(spec, self._lookup.name(func), z)
        if site is None:
            return func(*args, **kwargs)
        inplace = bool(kwargs.get("inplace", False)) or self._lookup.name(func) != getattr(func, "__name__", "")
        with torch._C.DisableTorchFunction():
            rec._before(site, z, inplace)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            with torch._C.DisableTorchFunction():
                rec._after(site, out, None if inplace else z)
        return out


class Recorder:
    """Hooks ``model``, records per-site activation statistics, and removes every hook on exit.

    Use as ``with Recorder(model) as rec: model(x)`` then ``rec.results()``. On exit (also after an
    exception) every hook is removed and each module's train/eval flag is restored. ``compile=True``
    uses the fast statistics kernels (`deadneuron.stats.Kernels`: the C kernel on CPU, else
    `torch.compile`); ``False`` the eager torch reference.
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
    ) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0 <= delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        self.model = model
        self.eps = eps
        self.delta = delta
        self.select = tuple(select) if select else None
        self.functional = functional
        self.kernels = Kernels(compile=compile)
        self.histograms = histograms
        self._handles: list[RemovableHandle] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._names: dict[nn.Module, str] = {}
        self._by_name: dict[str, nn.Module] = {}
        self._specs: dict[nn.Module, tuple[ActivationSpec, FlatRegion]] = {}
        self._sites: dict[tuple[Any, ...], _Site] = {}
        self._counts: dict[tuple[Any, ...], int] = {}
        self._producers: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._stack: list[tuple[str, bool]] = []
        self._pending: dict[nn.Module, list[_Site | None]] = {}
        self._mode: _FunctionalProbe | None = None
        self._suspended: list[bool] = []
        self._region_cache: dict[ActivationSpec, FlatRegion] = {}
        self.last_site: str | None = None
        self.last_module: str | None = None

    # -- context management -----------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self._modes = [(m, m.training) for m in self.model.modules()]
        try:
            self._register()
            if self.functional:
                self._mode = _FunctionalProbe(self)
                self._mode.__enter__()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._mode is not None:
                mode, self._mode = self._mode, None
                _remove_mode(mode)
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
        for name, m in self.model.named_modules():
            self._names[m] = name
            self._by_name[name] = m
            spec = spec_for_module(m)
            if m is not self.model and spec is not None and self._module_selected(name, spec):
                self._specs[m] = (spec, self._region(spec))
                self._pending[m] = []
                self._handles.append(m.register_forward_pre_hook(self._activation_pre_hook))
                self._handles.append(m.register_forward_hook(self._activation_hook))
            elif m is not self.model and spec is None and _quiet_leaf(m):
                self._handles.append(m.register_forward_pre_hook(self._leaf_enter_hook))
                self._handles.append(m.register_forward_hook(self._leaf_exit_hook))
            else:
                if spec is not None and self._module_selected(name, spec):  # the model is an activation
                    self._specs[m] = (spec, self._region(spec))
                    self._pending[m] = []
                    self._handles.append(m.register_forward_pre_hook(self._activation_pre_hook))
                    self._handles.append(m.register_forward_hook(self._activation_hook))
                self._handles.append(m.register_forward_pre_hook(self._enter_hook))
                self._handles.append(m.register_forward_hook(self._exit_hook))

    def _module_selected(self, name: str, spec: ActivationSpec) -> bool:
        return self.select is None or matches((name, spec.kind.value, f"kind:{spec.kind.value}"), self.select)

    def start_batch(self) -> None:
        """Forget per-forward bookkeeping (occurrence counters, producers, the module stack)."""
        self._counts.clear()
        self._producers.clear()
        self._stack.clear()
        self._suspended.clear()
        self._ensure_mode()
        self.last_site = None
        self.last_module = None

    # -- the functional probe is suspended inside modules where it has nothing to find ------------
    # (activation modules and torch's own leaves): every torch call made there would otherwise pass
    # through its Python __torch_function__ for nothing. A module that raises leaves it suspended;
    # the next forward pass (or start_batch) puts it back, and teardown removes it wherever it is.
    def _suspend(self) -> bool:
        mode = self._mode
        if mode is None:
            return False
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is mode:
            torch._C._pop_torch_function_stack()
            return True
        return False

    def _resume(self, suspended: bool) -> None:
        if suspended and self._mode is not None:
            torch._C._push_on_torch_function_stack(self._mode)

    def _ensure_mode(self) -> None:
        mode = self._mode
        if mode is not None and not any(
            torch._C._get_function_stack_at(i) is mode for i in range(torch._C._len_torch_function_stack())
        ):
            torch._C._push_on_torch_function_stack(mode)

    # -- generic hooks: the module stack and who produced which tensor ----------------------------
    def _enter_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        if m is self.model:
            self._counts.clear()
            self._producers.clear()
            self._stack.clear()
            self._suspended.clear()
            self._ensure_mode()
        self._stack.append((self._names[m], m in self._specs))

    def _exit_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        name = self.last_module = self._names[m]
        if self._stack:
            self._stack.pop()
        if type(out) is torch.Tensor:
            self._producers[id(out)] = (weakref.ref(out), name)
        else:
            for t in _tensors(out):
                self._producers[id(t)] = (weakref.ref(t), name)

    def _leaf_enter_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        self._suspended.append(self._suspend())

    def _leaf_exit_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        """A quiet leaf (see `_quiet_leaf`) is never on the stack: only what it produced is noted."""
        if self._suspended:
            self._resume(self._suspended.pop())
        name = self.last_module = self._names[m]
        if type(out) is torch.Tensor:
            self._producers[id(out)] = (weakref.ref(out), name)
        else:
            for t in _tensors(out):
                self._producers[id(t)] = (weakref.ref(t), name)

    def _producer_of(self, z: torch.Tensor) -> str | None:
        entry = self._producers.get(id(z))
        if entry is None or entry[0]() is not z:
            return None
        return entry[1]

    # -- activation module hooks --------------------------------------------------------------------
    # The hooks run with __torch_function__ handling off: otherwise every tensor method they call
    # (z.dim(), z.dtype...) would pass through the functional probe, a Python call each.
    # An activation module's two hooks also do what _enter_hook/_exit_hook do for other modules.
    def _activation_pre_hook(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        with torch._C.DisableTorchFunction():
            self._activation_pre(m, args)
        self._stack.append((self._names[m], True))
        self._suspended.append(self._suspend())

    def _activation_pre(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        z = _first_tensor(args, None)
        site = None
        if z is not None and z.is_floating_point():
            spec, region = self._specs[m]
            name = self._names[m]
            leaf = name.rsplit(".", 1)[-1]
            if not leaf or leaf.isdigit():  # an index in a Sequential says less than the kind
                leaf = spec.kind.value
            site = self._site((name,), name, leaf, False, spec, region, z)
            self._before(site, z, is_inplace(m))
        self._pending[m].append(site)

    def _activation_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self._suspended:
            self._resume(self._suspended.pop())
        pending = self._pending[m]
        site = pending.pop() if pending else None
        if site is not None and isinstance(out, torch.Tensor):
            with torch._C.DisableTorchFunction():
                self._after(site, out, None if is_inplace(m) else _first_tensor(args, None))
        if m is not self.model:
            self._exit_hook(m, args, out)

    # -- sites ----------------------------------------------------------------------------------
    def _functional_site(self, spec: ActivationSpec, fname: str, z: torch.Tensor) -> _Site | None:
        owner = self._stack[-1][0] if self._stack else ""
        if self.select is not None and not matches((owner, fname, f"kind:{spec.kind.value}"), self.select):
            return None
        return self._site(("F", fname, owner), owner, fname, True, spec, self._region(spec), z)

    def _region(self, spec: ActivationSpec) -> FlatRegion:
        """Flat regions are derived once per distinct activation (PReLU: per weight tensor)."""
        if spec.prelu_weight is not None:
            return flat_region(spec, self.delta)
        region = self._region_cache.get(spec)
        if region is None:
            region = self._region_cache[spec] = flat_region(spec, self.delta)
        return region

    def _site(
        self,
        owner_key: tuple[Any, ...],
        owner: str,
        leaf: str,
        functional: bool,
        spec: ActivationSpec,
        region: FlatRegion,
        z: torch.Tensor,
    ) -> _Site:
        producer = self._producer_of(z)
        if producer == owner:
            producer = None
        count_key = (*owner_key, producer)
        occurrence = self._counts.get(count_key, 0)
        self._counts[count_key] = occurrence + 1
        key = (*count_key, occurrence)
        site = self._sites.get(key)
        if site is None:
            axis = channel_axis(z, self._by_name.get(producer) if producer else None)
            channels = z.shape[axis] if z.dim() else 1
            site = _Site(
                owner, leaf, functional, producer, occurrence, spec, region, axis,
                ChannelStats(channels, z.device, kernels=self.kernels), tuple(z.shape),
                histogram=ValueHistogram(z.device) if self.histograms else None,
            )
            self._sites[key] = site
        site.calls += 1
        self.last_site = site.base_name
        return site

    # Statistics run with __torch_function__ handling off: our own ops must not pass through the
    # functional probe (that would cost a Python call per op, and is never what it looks for).
    def _before(self, site: _Site, z: torch.Tensor, inplace: bool) -> None:
        if site.flat_from_z_first(inplace):
            site.stats.update_flat(channel_view(z.detach(), site.axis), site.region.lo, site.region.hi)

    def _after(self, site: _Site, a: torch.Tensor, z: torch.Tensor | None) -> None:
        """Output statistics; the flat count too, in the same pass, unless `_before` took it.
        Called with __torch_function__ handling off (see the hooks)."""
        region = site.region
        a3 = channel_view(a.detach(), site.axis)
        if region.on_output:
            site.stats.update_output(a3, self.eps, flat=(region.out_lo, region.out_hi))
        elif z is not None and not isinstance(region.lo, torch.Tensor):
            z3 = channel_view(z.detach(), site.axis)
            site.stats.update_output(a3, self.eps, flat=(region.lo, region.hi), z3=z3)
        else:
            site.stats.update_output(a3, self.eps)
        if site.histogram is not None:
            site.histogram.update(a.detach())
        site.shape = tuple(a.shape)

    def state_bytes(self) -> int:
        """Memory held by the statistics of every site (O(channels), independent of batches)."""
        return sum(s.stats.state_bytes() for s in self._sites.values())

    # -- results -----------------------------------------------------------------------------------
    def site_names(self) -> list[str]:
        """Final names of the sites, in order of first call."""
        sites = list(self._sites.values())
        per_owner: dict[tuple[str, bool, str], int] = {}
        for s in sites:
            k = (s.owner, s.functional, s.leaf)
            per_owner[k] = per_owner.get(k, 0) + 1
        bases = []
        for s in sites:
            single_module = not s.functional and per_owner[(s.owner, False, s.leaf)] == 1
            bases.append(s.owner if single_module else s.base_name)
        seen: dict[str, int] = {}
        totals = {b: bases.count(b) for b in bases}
        names = []
        for b in bases:
            k = seen.get(b, 0)
            seen[b] = k + 1
            names.append(b if totals[b] == 1 else f"{b}#{k}")
        return names

    def results(self) -> list[SiteResult]:
        with torch._C.DisableTorchFunction():
            return self._results()

    def _results(self) -> list[SiteResult]:
        out = []
        for name, s in zip(self.site_names(), self._sites.values(), strict=True):
            out.append(
                SiteResult(
                    name=name,
                    module=s.owner,
                    producer=s.producer,
                    functional=s.functional,
                    kind=s.spec.kind.value,
                    label=s.spec.label,
                    channel_axis=s.axis,
                    flat_region=s.region.describe(),
                    example_shape=s.shape,
                    calls=s.calls,
                    summary=s.stats.compute(),
                    histogram=tuple(s.histogram.compute()) if s.histogram is not None else None,
                )
            )
        return out

