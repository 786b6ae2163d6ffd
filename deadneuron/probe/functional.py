"""The functional probe: a `TorchFunctionMode` that finds activation calls (``F.relu``, ``x.relu()``...)
made inside the model's forward, and hands them to the Recorder as sites. It also carries each tensor's
channel axis through the ops it sees (`deadneuron.probe.axisrules`).

Every torch call of the forward passes through `FunctionalProbe.__torch_function__` (torch has no filter
for a mode in C), so that method does one dict lookup and, for every function that is neither a possible
activation nor one with an axis rule, calls it straight away. The table of what is known about each
function (its rule, its spec maker, its site name) is built once per process for torch's own functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from deadneuron.functional_kinds import FunctionalActivations, Maker, Part, Unmeasured
from deadneuron.probe.axisrules import AxisRule, Producer, axis_rules
from deadneuron.probe.composite import SCALES, SIGMOIDS, Pending, Scaled, among, defers, scaled, swish
from deadneuron.probe.coverage import WEIGHT_REASON, is_weight, refuse_nested
from deadneuron.probe.measure import writable
from deadneuron.probe.order import REORDERING
from deadneuron.probe.products import product_rules
from deadneuron.probe.reductions import reduction_rules
from deadneuron.probe.scans import scan_rules
from deadneuron.probe.written import SEED_SITES, WHOLE_NAMES, Held, Written, WrittenActivation, input_of

if TYPE_CHECKING:
    from deadneuron.probe.recorder import Recorder
    from deadneuron.registry import ActivationRegistry

# Functions whose output is exactly torch.relu of their input: measured from the input alone (`measure_input`).
_EXACT_RELU = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
# ... of which those that return a new tensor: answered with relu's values where the kernel wrote them
_NEW_RELU = frozenset({F.relu, torch.relu, torch.Tensor.relu})


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    given = kwargs.get("input") if kwargs else None
    return given if isinstance(given, torch.Tensor) else None


@dataclass(frozen=True, slots=True)
class Entry:
    """What the probe knows about one torch function: its axis rule (``producer``: one that fixes the
    axis whatever the input), and where it can be an activation, its spec maker, site name and
    whether its name says it works in place (``relu_``)."""

    rule: AxisRule | None
    producer: bool = False
    make: Maker | None = None
    name: str = ""
    inplace: bool = False
    reorders: bool = False  # it reorders positions (flip, roll, gather...: `deadneuron.probe.order`)


def _entry(func: Any, rule: AxisRule | None, make: Maker | None) -> Entry:
    producer = isinstance(rule, Producer)
    if make is None:
        return Entry(rule, producer, reorders=func in REORDERING)
    return Entry(rule, producer, make, FunctionalActivations.site_name(func), FunctionalActivations.inplace(func, None))


@functools.cache
def _rules() -> Mapping[Any, AxisRule]:
    """The axis rules of torch's ops (`axis_rules`), of matrix products with a weight (`product_rules`), of
    reductions (`reduction_rules`) and of ops along one dim (`scan_rules`)."""
    return MappingProxyType({**axis_rules(), **product_rules(), **reduction_rules(), **scan_rules()})


@functools.cache
def _torch_entries() -> Mapping[Any, Entry]:
    rules = _rules()
    table = {func: _entry(func, rule, None) for func, rule in rules.items()}
    for func, make in FunctionalActivations(None).makers().items():
        table[func] = _entry(func, rules.get(func), make)
    for func in REORDERING:  # those no axis rule names (__setitem__)
        table.setdefault(func, _entry(func, None, None))
    return MappingProxyType(table)


def entries(registry: ActivationRegistry | None) -> Mapping[Any, Entry]:
    """Torch's functions, and the torch functions ``registry`` declares activations."""
    base = _torch_entries()
    declared = registry.functions() if registry is not None else {}
    if not declared:
        return base
    makers, rules = FunctionalActivations(registry).makers(), _rules()
    table = dict(base)
    for func in declared:
        table[func] = _entry(func, rules.get(func), makers[func])
    return table


class FunctionalProbe(TorchFunctionMode):
    """Finds functional activation calls made inside the model's forward."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder
        self._stack = recorder._stack  # (name, is an activation module) of the modules running now
        self._axes = recorder.axes
        self._order = recorder.axes.order
        self._entries = entries(recorder.activations)
        self._written = Written()  # activations written as one expression (`deadneuron.probe.written`)
        # a sigmoid call measured once the next call shows what it was, or a written activation until its last call,
        self.pending: Pending | Scaled | Held | None = None
        self._scaled: Scaled | None = None  # or a product of a tensor and a number: a sigmoid's input, perhaps

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if self.pending is not None:
            taken, result = self.settle(func, args, kwargs)
            if taken:
                return result
        try:
            entry = self._entries.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            entry = None
        if entry is None:
            if not self._order.marks:
                return func(*args, **kwargs) if kwargs else func(*args)
            out = func(*args, **kwargs) if kwargs else func(*args)
            self._order.carry(args, kwargs, out)
            return out
        kwargs = kwargs or {}
        stack = self._stack
        if not stack or stack[-1][1]:  # outside the model's forward, or inside an activation module
            fused = self._recorder.fused  # an nn.ReLU's call, whose values its pre-hook's kernel pass wrote
            if fused is not None and func in _NEW_RELU and args and args[0] is fused[0] and not kwargs.get("inplace"):
                self._recorder.fused = None
                return fused[1]
            return func(*args, **kwargs)
        if entry.make is not None:
            return self._activation(entry, func, args, kwargs)
        out = func(*args, **kwargs)
        if func in SCALES and self.pending is None:  # (hashable: it has an entry)
            self.pending = scaled(func, args, kwargs, out)
        if entry.reorders:
            self._order.reorder(func, args, kwargs, out, self._axes.known)
        elif self._order.marks:
            self._order.carry(args, kwargs, out)
        if entry.producer:  # (torch pops this mode while it runs: the rules' own tensor calls stay in C)
            self._axes.produce(entry.rule, args, kwargs, out)  # type: ignore[arg-type]
        elif entry.rule is not None:
            self._axes.carry(entry.rule, args, kwargs, out)
        return out

    def _carry(self, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note the channel axis of ``out`` where the function has an axis rule. (Torch pops this mode
        while its handler runs, so the rule's own tensor calls do not come back here.) The positions
        reordered in ``args``, if any, are carried too."""
        self._order.carry(args, kwargs, out)
        if entry.rule is not None:
            if entry.producer:
                self._axes.produce(entry.rule, args, kwargs, out)
            else:
                self._axes.carry(entry.rule, args, kwargs, out)

    def _activation(self, entry: Entry, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A function that can be an activation: a site where this call is one (measured around the call),
        else a plain call whose axis is carried like any op's."""
        rec, before, self._scaled = self._recorder, self._scaled, None
        if type(self.pending) is Held:  # a call of the written activation under way (`written`)
            out = func(*args, **kwargs)
            self._carry(entry, args, kwargs, out)
            return out
        try:
            spec = entry.make(args, kwargs)  # type: ignore[misc]
        except TypeError:  # arguments no activation takes: not one
            return func(*args, **kwargs)
        z = first_tensor(args, kwargs) if spec is not None else None
        if z is not None and z.dtype == torch.bool and entry.name in WHOLE_NAMES:  # where(x > 0, x, ...): x
            z = next((t for t in args[1:] if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        site = None
        if z is not None:
            refuse_nested(z, f"{self._stack[-1][0] if self._stack else ''}.{entry.name}".lstrip("."))
        if z is not None and z.is_floating_point() and entry.name in SEED_SITES and not is_weight(z) \
                and (found := self._written.at()) is not None:  # fmt: skip
            written = self._written_call(found, entry, func, args, kwargs, z)
            if written is not None:
                return written[0]
        if isinstance(spec, Part):  # no activation alone
            z = None
        if z is not None and z.is_floating_point():
            if isinstance(spec, Unmeasured):
                rec.coverage.unmeasured_call(self._stack[-1][0], entry.name, spec.reason)
            elif is_weight(z):  # a weight transform, not an activation of data
                rec.coverage.unmeasured_call(self._stack[-1][0], entry.name, WEIGHT_REASON)
            elif defers(spec, entry.inplace or bool(kwargs.get("inplace", False))):  # type: ignore[arg-type]
                out = func(*args, **kwargs)
                self._carry(entry, args, kwargs, out)
                if isinstance(out, torch.Tensor):
                    x, beta = (before.x, before.beta) if before is not None and before.out is z else (z, 1.0)
                    self.pending = Pending(spec, entry.name, z, out, x, beta)  # type: ignore[arg-type]
                return out
            else:
                site = rec._functional_site(spec, entry.name, z)  # type: ignore[arg-type]
        if site is None:
            out = func(*args, **kwargs)
            self._carry(entry, args, kwargs, out)
            return out
        inplace = entry.inplace or bool(kwargs.get("inplace", False))
        with torch._C.DisableTorchFunction():  # relu's values, where the statistics pass wrote them
            out = rec._before(site, z, inplace, relu=func in _EXACT_RELU, write=func in _NEW_RELU and writable(z))  # type: ignore[arg-type]
        if out is None:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            with torch._C.DisableTorchFunction():
                rec._after(site, out, None if inplace else z)
                self._carry(entry, args, kwargs, out)
        return out

    def _written_call(self, found: tuple[WrittenActivation, Any], entry: Entry, func: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any], z: torch.Tensor) -> tuple[Any] | None:  # fmt: skip
        """A call inside an activation written as one expression (`deadneuron.probe.written`), run: (its output,).
        Where it is the expression's first such call, the expression is held (`pending`) with its input until its
        last call. None where the input cannot be read (then the call is measured alone)."""
        written, frame = found
        x = input_of(written, frame, z) if written.first else None
        if written.first and x is None:
            return None
        out = func(*args, **kwargs)
        self._carry(entry, args, kwargs, out)
        if x is not None and written.whole:  # the call is the activation: measured with its output now
            self._measure_written(Held(written, frame, x), out)
        elif x is not None:
            self.pending = Held(written, frame, x)
        return (out,)

    def _settle_written(self, held: Held, func: Any, args: tuple[Any, ...], kwargs: Any) -> tuple[bool, Any]:
        """`settle` for a written activation: the call made at the expression's own place is its last, measured
        with its output; one inside the expression keeps it held; anything else measures it with the expression
        computed again on its input."""
        frame, place = self._written.place() if func is not None else (None, None)
        if frame is held.frame and place is not None:
            if place == held.written.span:
                out = func(*args, **(kwargs or {}))
                self._measure_written(held, out)
                try:
                    entry = self._entries.get(func)
                except TypeError:
                    entry = None
                if entry is not None:
                    self._carry(entry, args, kwargs or {}, out)
                return True, out
            if held.written.holds(place):
                self.pending = held
                return False, None
        with torch._C.DisableTorchFunction(), torch.no_grad():
            self._measure_written(held, held.written.fn(held.x))
        return False, None

    def _measure_written(self, held: Held, out: Any) -> None:
        site = self._recorder._functional_site(held.written.spec, held.written.name, held.x)
        if site is not None and isinstance(out, torch.Tensor) and out.shape == held.x.shape:
            with torch._C.DisableTorchFunction():
                self._recorder._before(site, held.x, False)
                self._recorder._after(site, out, held.x)

    def settle(self, func: Any = None, args: tuple[Any, ...] = (), kwargs: Any = None) -> tuple[bool, Any]:
        """Settle what `pending` holds before ``func`` runs (None: a hook changes the module stack). A sigmoid call
        (`deadneuron.probe.composite`): measured as SiLU where ``func(*args)``, the call after it, multiplies it by
        its own input, that call then run and returned, (True, its result); else as the sigmoid, (False, None). A
        product with a number: kept for ``func`` if a sigmoid's. A written activation: `_settle_written`."""
        pending, self.pending = self.pending, None
        if type(pending) is Scaled:  # kept for the call after it, a sigmoid's, only
            self._scaled = pending if among(func, SIGMOIDS) else None
            return False, None
        if type(pending) is Held:
            return self._settle_written(pending, func, args, kwargs)
        assert isinstance(pending, Pending)
        rec = self._recorder
        written = None if func is None else swish(pending, func, args, kwargs)
        spec, name, z = (pending.spec, pending.name, pending.z) if written is None else (*pending.swish(), pending.x)
        site = rec._functional_site(spec, name, z)
        if site is None:  # left out by a select: the call runs as any other
            return False, None
        with torch._C.DisableTorchFunction():
            rec._before(site, z, bool(written))
            if written is None:
                rec._after(site, pending.out, z)
                return False, None
        out = func(*args)  # (torch pops this mode while its handler runs: this runs in C)
        with torch._C.DisableTorchFunction():
            rec._after(site, out, None if written else z)
            entry = self._entries.get(func)
            if entry is not None:
                self._carry(entry, args, {}, out)
        return True, out
