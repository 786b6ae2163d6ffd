"""The functional probe: a `TorchFunctionMode` that finds activation calls (``F.relu``, ``x.relu()``...)
made inside the model's forward, and hands them to the Recorder as sites. It also carries each tensor's
channel axis through the ops it sees (`deadneuron.probe.axisrules`: one dict lookup per op)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from deadneuron.functional_kinds import FunctionalActivations, Unmeasured
from deadneuron.probe.axisrules import AxisRule, axis_rules

if TYPE_CHECKING:
    from deadneuron.probe.recorder import Recorder


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


class FunctionalProbe(TorchFunctionMode):
    """Finds functional activation calls made inside the model's forward."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder
        self._lookup = FunctionalActivations(recorder.activations)
        self._axis_rules = axis_rules()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        rec = self._recorder
        if not rec._stack or rec._stack[-1][1]:
            return func(*args, **kwargs)
        try:
            spec = self._lookup.lookup(func, args, kwargs)
            rule = self._axis_rules.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            spec = rule = None
        if spec is None:
            if rule is None:
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            rec.axes.propagate(rule, args, kwargs, out)
            return out
        z = first_tensor(args, kwargs)
        if z is None or not z.is_floating_point():
            return self._carry(rule, func, args, kwargs)
        if isinstance(spec, Unmeasured):
            rec.coverage.unmeasured_call(rec._stack[-1][0], self._lookup.site_name(func), spec.reason)
            return self._carry(rule, func, args, kwargs)
        site = rec._functional_site(spec, self._lookup.site_name(func), z)
        if site is None:
            return self._carry(rule, func, args, kwargs)
        inplace = self._lookup.inplace(func, kwargs)
        with torch._C.DisableTorchFunction():
            rec._before(site, z, inplace)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            with torch._C.DisableTorchFunction():
                rec._after(site, out, None if inplace else z)
                if rule is not None:
                    rec.axes.propagate(rule, args, kwargs, out)
        return out

    def _carry(self, rule: AxisRule | None, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``func``; where it has an axis rule, note the channel axis of its result. (Torch pops
        this mode while its handler runs, so the rule's own tensor calls do not come back here.)"""
        out = func(*args, **kwargs)
        if rule is not None:
            self._recorder.axes.propagate(rule, args, kwargs, out)
        return out
