"""Re-initialising dead channels, ReDo-style (Sokar et al. 2023), on a model that is already a copy.

For each dead channel c of a site: the layer that produced it (the conv/linear feeding the activation,
through BatchNorm, Identity or Dropout) gets fresh incoming weights for c (its own initialiser, seeded);
the BatchNorm in between gets its statistics and affine parameters for c reset (mean 0, var 1, gamma 1,
beta 0: a dead channel's beta is what keeps it negative); the layer that consumes the activation
(through Dropout or Identity) gets zero outgoing weights for c, so the network's function is unchanged
at the moment of surgery. The optimizer's moment estimates for every touched slice are zeroed.

Which layer feeds and which consumes a site is measured, not guessed from names: one forward pass on an
example batch records which module call produced each tensor. What cannot be found (a consumer behind a
non-module operation such as ``x + pos``) is reported, not invented. Sites are named as the audit's
Recorder names them: after the last module that returned the activation's input (a container returning
its child's tensor, a layer whose added BatchNorm runs in its forward hook: ``c2>relu``), while the walk
upstream goes from leaf to leaf (``c2.batchnorm``, then ``c2``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deadneuron.functional_kinds import FunctionalActivations
from deadneuron.patch.hooks import CHILD, has_added_batchnorm
from deadneuron.patch.layers import fresh_rows, is_transposed, reads, writes, zero_inputs
from deadneuron.probe.composite import Pending, defers, swish
from deadneuron.probe.functional import tensors as tensors_in
from deadneuron.probe.written import SEED_SITES, Written, WrittenActivation, input_of
from deadneuron.registry import default_registry

spec_for_module = default_registry.spec_for_module  # built-in kinds, known modules, the user's registered ones

_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class _Call:
    name: str  # module name, or the owner module's name for a functional call
    leaf: str  # attribute name of the module, or the function name
    module: nn.Module | None
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor | None
    activation: bool = False
    source: _Call | None = None  # the leaf call that produced inputs[0], at the time of this call
    producer: str | None = None  # the last module that returned inputs[0] (the Recorder's producer)


@dataclass(frozen=True)
class Slice:
    """Entries of one parameter that were changed: ``index`` along ``dim``."""

    param: str
    dim: int
    index: tuple[int, ...]


@dataclass
class ReinitResult:
    changed: list[tuple[str, str]] = field(default_factory=list)  # (layer, what was done to it)
    missing: list[str] = field(default_factory=list)  # what could not be done
    slices: list[Slice] = field(default_factory=list)


class _FunctionalCalls(TorchFunctionMode):
    """Functional activation calls, named as the audit's probe names them: a sigmoid multiplied by its own input
    is a SiLU (`deadneuron.probe.composite`), an activation written as one expression is that expression
    (`deadneuron.probe.written`), each recorded once the call that completes it ran."""

    def __init__(self, flow: _Dataflow) -> None:
        super().__init__()
        self.flow, self.lookup, self.written = flow, FunctionalActivations(), Written()
        self.sigmoid: tuple[Pending, str] | None = None  # a sigmoid call and its owner, until the next call
        self.expression: tuple[WrittenActivation, Any, torch.Tensor, str] | None = None  # with frame, input, owner

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if (self.sigmoid is not None or self.expression is not None) and (done := self.settle(func, args, kwargs)):
            return done[0]
        out = func(*args, **kwargs)
        try:
            spec = self.lookup.spec(func, args, kwargs)
        except TypeError:
            spec = None
        z = args[0] if args and isinstance(args[0], torch.Tensor) else None
        owner, inside_activation = self.flow.stack[-1] if self.flow.stack else ("", False)
        if z is None or not isinstance(out, torch.Tensor) or inside_activation:  # nn.ReLU calls F.relu: the module's
            return out
        if FunctionalActivations.site_name(func) in SEED_SITES and (found := self.written.at()) is not None:
            written, frame = found
            x = input_of(written, frame, z) if written.first else None
            if x is not None:
                self.expression = (written, frame, x, owner)
            if x is not None or not written.first:
                return out
        if spec is not None and defers(spec, FunctionalActivations.inplace(func, kwargs)):
            self.sigmoid = (Pending(spec, "sigmoid", z, out, z), owner)
        elif spec is not None:
            self.flow.record(_Call(owner, FunctionalActivations.name(func), None, (z,), out, activation=True))
        return out

    def settle(self, func: Any = None, args: tuple[Any, ...] = (), kwargs: Any = None) -> tuple[Any] | None:
        """Record the held call: a written activation with the output of its last call (run here: (its output,)),
        kept while calls inside it run; a sigmoid as SiLU where ``func(*args)`` multiplies it by its input (run
        here: (its output,)), else as the sigmoid, before ``func`` runs (or a hook changes the stack): None."""
        if self.expression is not None:
            (written, frame, x, owner), self.expression = self.expression, None
            there, place = self.written.place() if func is not None else (None, None)
            if there is frame and place == written.span:
                out = func(*args, **(kwargs or {}))
                self.flow.record(_Call(owner, written.name, None, (x,), out, activation=True))
                return (out,)
            if there is frame and place is not None and written.holds(place):
                self.expression = (written, frame, x, owner)
        if self.sigmoid is not None:
            (pending, owner), self.sigmoid = self.sigmoid, None
            if func is not None and swish(pending, func, args, kwargs) is not None:
                out = func(*args, **(kwargs or {}))
                self.flow.record(_Call(owner, "silu", None, (pending.z,), out, activation=True))
                return (out,)
            self.flow.record(_Call(owner, "sigmoid", None, (pending.z,), pending.out, activation=True))
        return None


class _Dataflow:
    """One forward pass: every module call and functional activation, with who produced its input."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.producer: dict[int, _Call] = {}
        self.returned: dict[int, tuple[torch.Tensor, str]] = {}  # tensor id -> (tensor, last module returning it)
        self.stack: list[tuple[str, bool]] = []  # (module name, is an activation module)

    def record(self, call: _Call) -> None:
        first = call.inputs[0] if call.inputs else None
        call.source = self.producer.get(id(first)) if first is not None else None
        named = self.returned.get(id(first)) if first is not None else None
        call.producer = named[1] if named is not None and named[0] is first else None
        self.calls.append(call)
        if call.output is not None:
            self.producer[id(call.output)] = call

    def returned_by(self, name: str, out: Any) -> None:
        """``out`` was returned by the module called ``name`` (the tensors are kept: their ids stay unique)."""
        for t in tensors_in(out):
            self.returned[id(t)] = (t, name)

    def link_added_batchnorm(self, name: str, layer: nn.Module, args: tuple[Any, ...]) -> None:
        """``layer`` ran its added BatchNorm in its forward hook: record the layer as the leaf that produced
        the BatchNorm's input, so that the walk upstream reaches its weights through the BatchNorm."""
        norm = layer._modules.get(CHILD)
        bn = next((c for c in reversed(self.calls) if c.module is norm), None)
        if bn is None or not bn.inputs:
            return
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        own = _Call(name, name.rsplit(".", 1)[-1], layer, inputs, bn.inputs[0])
        self.record(own)
        bn.source = own

    def consumers(self, t: torch.Tensor) -> list[_Call]:
        return [c for c in self.calls if c.inputs and c.inputs[0] is t]


def dataflow(model: nn.Module, run: Callable[[nn.Module], Any]) -> _Dataflow:
    """Record one forward pass (``run(model)``) of ``model`` in eval mode, without gradients."""
    flow = _Dataflow()
    from deadneuron.wrappers import user_named_modules

    names = {m: n for n, m in user_named_modules(model)}  # the Recorder's names: wrappers left out
    handles = []
    calls = _FunctionalCalls(flow)

    def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        calls.settle()
        flow.stack.append((names[m], spec_for_module(m) is not None))

    def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls.settle()
        flow.stack.pop()
        if has_added_batchnorm(m):
            flow.link_added_batchnorm(names[m], m, args)
        if next(m.children(), None) is None:  # leaves only: a container returns its child's tensor
            inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
            leaf = names[m].rsplit(".", 1)[-1]
            spec = spec_for_module(m)
            if spec is not None and (not leaf or leaf.isdigit()):  # named as the Recorder names it
                leaf = spec.kind_name
            output = out if isinstance(out, torch.Tensor) else None
            flow.record(_Call(names[m], leaf, m, inputs, output, activation=spec_for_module(m) is not None))
        flow.returned_by(names[m], out)

    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in names:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        model.eval()
        with torch.no_grad(), calls:
            run(model)
        calls.settle()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    return flow


def site_calls(flow: _Dataflow, site: str) -> list[_Call]:
    """The activation calls that make up ``site`` (named as the Recorder names it)."""
    base, _, index = site.partition("#")
    hits = [c for c in flow.calls if c.activation and base in _names_of(c)]
    if index.isdigit():
        k = int(index)
        return hits[k : k + 1]
    return hits


def _names_of(call: _Call) -> set[str]:
    names = {call.name} if call.module is not None else {f"{call.name}.{call.leaf}" if call.name else call.leaf}
    if call.producer:
        names.add(f"{call.producer}>{call.leaf}")
    return names


# Fresh rows are drawn under the seed plus this salt: under the seed itself (0 by default, the seed most models
# are built under) a first layer built right after torch.manual_seed(0) would get its own rows back.
_FRESH_SALT = 0x5EED


def reinit_dead(
    model: nn.Module,
    channels: Mapping[str, Sequence[int]],
    flow: _Dataflow,
    *,
    seed: int = 0,
) -> ReinitResult:
    """Re-initialise ``channels`` (site -> dead channel ids) of ``model`` in place; what was done."""
    result = ReinitResult()
    params = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_FRESH_SALT + seed)
        for site, ids in channels.items():
            ids = sorted({int(c) for c in ids})
            calls = site_calls(flow, site)
            if not ids:
                continue
            if not calls:
                result.missing.append(f"{site}: not seen in the forward pass; channels {ids} left as they are")
                continue
            for call in calls:
                _reinit_call(call, ids, flow, params, result, site)
    result.changed = list(dict.fromkeys(result.changed))
    result.missing = list(dict.fromkeys(result.missing))
    return result


def unreachable_sites(flow: _Dataflow, sites: Sequence[str]) -> dict[str, str]:
    """The sites of ``sites`` whose dead channels :func:`reinit_dead` could not give fresh incoming
    weights, each with the reason; measured on ``flow``, nothing changed."""
    out: dict[str, str] = {}
    for site in sites:
        calls = site_calls(flow, site)
        if not calls:
            out[site] = "not seen in the forward pass that maps layers to sites"
        elif any(_upstream(call.source, _channels(call))[0] is None for call in calls):
            out[site] = "no conv/linear layer feeds it directly"
    return out


def _reinit_call(call: _Call, ids: list[int], flow: _Dataflow, params: dict[int, str],
                 result: ReinitResult, site: str) -> None:  # fmt: skip
    incoming, norms = _upstream(call.source, _channels(call))
    if incoming is None:
        result.missing.append(f"{site}: no conv/linear layer feeds it directly; incoming weights left as they are")
    else:
        fresh_rows(incoming.module, ids, _noter(params, result, ids))  # type: ignore[arg-type]
        result.changed.append((incoming.name, f"fresh incoming weights for channels {_ids(ids)} of {site}"))
    for bn in norms:
        _reset_bn(bn.module, ids, params, result)  # type: ignore[arg-type]
        result.changed.append((bn.name, f"statistics, gamma and beta reset for channels {_ids(ids)} of {site}"))
    outgoing = _downstream(flow, call.output, _channels(call)) if call.output is not None else []
    if not outgoing:
        result.missing.append(f"{site}: its output reaches no conv/linear layer directly (it goes through "
                              "non-module operations); outgoing weights left as they are")  # fmt: skip
    for layer in outgoing:
        zero_inputs(layer.module, ids, _noter(params, result, ids))  # type: ignore[arg-type]
        result.changed.append((layer.name, f"outgoing weights of channels {_ids(ids)} of {site} set to 0"))


def _channels(call: _Call) -> int:
    x = call.inputs[0]
    source = call.source.module if call.source is not None else None
    first = isinstance(source, (nn.modules.conv._ConvNd, _BATCHNORM)) or (x.dim() >= 4 and not isinstance(source, nn.Linear)
                                                                         and not is_transposed(source))  # fmt: skip
    return int(x.shape[1] if first and x.dim() > 1 else x.shape[-1] if x.dim() else 1)  # a 0-dim input: one channel


def _upstream(call: _Call | None, len_channels: int) -> tuple[_Call | None, list[_Call]]:
    norms: list[_Call] = []
    while call is not None and call.module is not None:
        m = call.module
        if isinstance(m, _BATCHNORM) and m.num_features == len_channels:
            norms.append(call)
        elif writes(m, len_channels):
            return call, norms
        elif not isinstance(m, _PASS_THROUGH):
            return None, norms
        call = call.source
    return None, norms


def _downstream(flow: _Dataflow, t: torch.Tensor, channels: int) -> list[_Call]:
    """Conv/linear layers reading ``t`` directly or through Dropout/Identity (which may return ``t`` itself)."""
    found: list[_Call] = []
    seen: set[int] = set()
    frontier = [t]
    while frontier:
        tensor = frontier.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for call in flow.consumers(tensor):
            if isinstance(call.module, _PASS_THROUGH) and call.output is not None:
                frontier.append(call.output)
            elif call.module is not None and reads(call.module, channels):
                found.append(call)
    return list({id(c.module): c for c in found}.values())


def _reset_bn(bn: nn.Module, ids: list[int], params: dict[int, str], result: ReinitResult) -> None:
    for name, value in (("running_mean", 0.0), ("running_var", 1.0), ("weight", 1.0), ("bias", 0.0)):
        t = getattr(bn, name, None)
        if isinstance(t, torch.Tensor):
            t[torch.tensor(ids, device=t.device)] = value
    for name in ("weight", "bias"):
        p = getattr(bn, name, None)
        if isinstance(p, torch.Tensor):
            result.slices.append(Slice(params[id(p)], 0, tuple(ids)))


def reset_optimizer_rows(state: Mapping[str, Any], model: nn.Module, slices: Sequence[Slice]) -> dict[str, Any]:
    """A copy of an optimizer ``state_dict`` (one param group order = ``model.parameters()``) whose
    per-parameter tensors (Adam's moments...) are zero on every changed slice."""
    out = copy.deepcopy(dict(state))
    order = [n for n, _ in model.named_parameters()]
    ids = [i for group in out.get("param_groups", []) for i in group.get("params", [])]
    by_name = dict(zip(order, ids, strict=False))
    for s in slices:
        entry = out.get("state", {}).get(by_name.get(s.param, -1))
        if not entry:
            continue
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.dim() > s.dim:
                value.index_fill_(s.dim, torch.tensor(s.index, device=value.device), 0.0)
    return out


def _noter(params: dict[int, str], result: ReinitResult, ids: list[int]) -> Callable[[torch.Tensor, int], None]:
    return lambda p, dim: result.slices.append(Slice(params[id(p)], dim, tuple(ids)))


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(map(str, ids[:8]))
    return f"{shown} and {len(ids) - 8} more" if len(ids) > 8 else shown


__all__ = ["ReinitResult", "Slice", "dataflow", "reinit_dead", "reset_optimizer_rows", "site_calls", "unreachable_sites"]
