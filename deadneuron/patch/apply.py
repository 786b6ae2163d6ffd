"""Applying a plan: module surgery on a deep copy of a model, or a new config for an adapter model.

:func:`apply_plan` never touches the model it is given. Activation modules are replaced wherever they
are referenced (a module shared by four call sites changes at all four, and stays shared); functional
activations are rewritten with torch.fx module by module (:mod:`deadneuron.patch._functional`); dropout
is a forward hook on the selected activations; dead channels are re-initialised ReDo-style
(:mod:`deadneuron.patch.reinit`); BatchNorm is added after the layer feeding a site
(:mod:`deadneuron.patch.batchnorm`). With an example batch the result is audited once more, and any
selected site still running the old activation is listed with the reason (usually fx's) in a PatchError.

:func:`apply_to_config` is the same plan for an adapter model: the ops become config changes
(ACTIVATION, NEGATIVE_SLOPE, LEARNING_RATE, NUM_EPOCHS, DROPOUT_BETWEEN_CONVS and DROPOUT).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deadneuron._inputs import default_forward
from deadneuron.activations import spec_for_module
from deadneuron.errors import PatchError
from deadneuron.measure import measure
from deadneuron.ops import AddBatchNorm, InsertDropout, ReinitDead, SetHyperParameter, SwapActivation
from deadneuron.patch._functional import FunctionalSwap, replace_module, swap_functional
from deadneuron.patch.plan import Plan
from deadneuron.patch.record import ApplyRecord, Change, RecordBuilder
from deadneuron.replacements import REPLACEMENTS
from deadneuron.report import Report
from deadneuron.select import matches

Forward = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class PatchResult:
    model: nn.Module
    record: ApplyRecord
    optimizer_slices: tuple[Any, ...] = ()  # reinit.Slice values, for resetting optimizer state
    resolved: Plan = field(default_factory=Plan)  # the plan with selectors pinned to what was changed


# --- generic models ---------------------------------------------------------------------------------


def make_activation(op: SwapActivation, *, inplace: bool = False) -> nn.Module:
    """The module for ``op.to`` (keeping ``inplace`` where the new kind has it)."""
    return REPLACEMENTS[op.to].module(negative_slope=op.negative_slope, inplace=inplace)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    report: Any = None,
    example: Any = None,
    forward: Forward | None = None,
    seed: int = 0,
    strict: bool = True,
) -> PatchResult:
    """Apply ``plan`` to a deep copy of ``model``; ``model`` itself is never modified.

    ``report`` (a :class:`deadneuron.Report` of ``model``) maps site names to modules and supplies the dead
    channels of a ``ReinitDead`` op without channel lists; ``example`` (one batch, fed by ``forward``)
    lets dropout and re-initialisation find the layers around each site and lets the result be checked.
    With ``strict`` (default) anything selected that could not be patched raises PatchError.
    """
    run = forward or default_forward
    patched = copy.deepcopy(model)
    acc = RecordBuilder()
    sites = _site_modules(report)
    trace_errors: dict[str, str] = {}
    slices: tuple[Any, ...] = ()
    for op in plan.ops:
        if isinstance(op, SwapActivation):
            patched = _swap(patched, op, sites, acc, trace_errors)
        elif isinstance(op, InsertDropout):
            _insert_dropout(patched, op, report, acc)
        elif isinstance(op, ReinitDead):
            slices = _reinit(patched, op, report, example, run, seed, acc)
        elif isinstance(op, AddBatchNorm):
            _add_batchnorm(patched, op, report, example, run, acc)
        elif isinstance(op, SetHyperParameter):
            acc.notes.append(f"{op.describe()}: a model without an adapter has no training config; it is recorded in "
                             "the plan for your training script")  # fmt: skip
    swap = plan.get(SwapActivation)
    if swap is not None and example is not None:
        _check_swapped(patched, swap, example, run, trace_errors, acc)
    result = PatchResult(patched, acc.record(), slices, _resolved(plan, acc))
    if strict and result.record.not_patched:
        raise PatchError(_failure_message(result.record))
    return result


def _resolved(plan: Plan, acc: RecordBuilder) -> Plan:
    """``plan`` with its selectors replaced by exactly what was changed; without re-initialisation (the
    weights carry it). Applied to a freshly built model it reproduces the patched architecture."""
    ops: list[Any] = []
    for op in plan.ops:
        if isinstance(op, SwapActivation) and acc.swapped:
            ops.append(SwapActivation(op.to, op.negative_slope, tuple(dict.fromkeys(acc.swapped)), op.source))
        elif isinstance(op, InsertDropout) and acc.dropped:
            ops.append(InsertDropout(op.p, tuple(acc.dropped)))
        elif isinstance(op, AddBatchNorm) and acc.normed:
            ops.append(AddBatchNorm(tuple(acc.normed)))
        elif isinstance(op, SetHyperParameter):
            ops.append(op)
    return Plan(tuple(ops))


def _failure_message(record: ApplyRecord) -> str:
    items = "; ".join(record.not_patched[:4])
    more = f"; and {len(record.not_patched) - 4} more" if len(record.not_patched) > 4 else ""
    return (f"could not apply the whole plan ({len(record.not_patched)} item(s)): {items}{more}. Replace functional "
            "calls (F.relu) in untraceable code by activation modules (self.act = nn.ReLU()), or narrow the "
            "selection with --select")  # fmt: skip


def _site_modules(report: Any) -> dict[str, tuple[str, bool, str | None]]:
    """site name -> (module or owner name, functional, producer), from a Report."""
    if report is None:
        return {}
    return {name: (s.module, bool(s.functional), s.producer) for name, s in report.sites.items()}


class _Selector:
    """Shell globs over candidate names that remember which patterns matched something."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.used: set[str] = set()

    def __call__(self, candidates: Sequence[str]) -> bool:
        hits = [p for p in self.patterns if any(fnmatchcase(c, p) for c in candidates if c)]
        self.used.update(hits)
        return bool(hits)

    def unused(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]


def _module_candidates(name: str, kind: str, patterns: Sequence[str],
                       sites: Mapping[str, tuple[str, bool, str | None]]) -> tuple[str, ...]:  # fmt: skip
    own_sites = [s for s, (module, functional, _) in sites.items() if module == name and not functional]
    return (name, f"module:{name}", kind, f"kind:{kind}", *own_sites, *_guessed_site_names(name, patterns))


def _guessed_site_names(module: str, patterns: Sequence[str]) -> list[str]:
    """Without a report: ``producer>leaf`` patterns whose leaf is this module's attribute name and whose
    producer lives under this module's parent (``encoder.bn_layers.2>relu`` -> ``encoder.relu``)."""
    parent, _, leaf = module.rpartition(".")
    out = []
    for p in patterns:
        producer, sep, site_leaf = p.partition("#")[0].rpartition(">")
        if sep and site_leaf == leaf and (not parent or producer.startswith(f"{parent}.")):
            out.append(p)
    return out


def _swap(model: nn.Module, op: SwapActivation, sites: Mapping[str, tuple[str, bool, str | None]],
          acc: RecordBuilder, trace_errors: dict[str, str]) -> nn.Module:  # fmt: skip
    target_kind = REPLACEMENTS[op.to].kind.value
    replaced: dict[int, nn.Module] = {}
    pick = _Selector(op.sites)
    for name, m in list(model.named_modules()):
        spec = spec_for_module(m)
        if spec is None or id(m) in replaced:
            continue
        kind = spec.kind.value
        if not (kind == op.source if not op.sites else pick(_module_candidates(name, kind, op.sites, sites))):
            continue
        if spec == spec_for_module(make_activation(op)):
            acc.notes.append(f"{name} already is {spec.label}")
            continue
        new = make_activation(op, inplace=bool(getattr(m, "inplace", False))).to(_device_of(model))
        places = replace_module(model, m, new)
        replaced[id(m)] = new
        acc.swapped.append(f"module:{name}")
        shared = sum(1 for module, functional, _ in sites.values() if module == name and not functional)
        note = f"shared by {shared} call sites: changed at all of them" if shared > 1 else ""
        if len(places) > 1:
            note = f"registered as {', '.join(places)}; changed everywhere" + (f"; {note}" if note else "")
        acc.changes.append(Change(name, spec.label, _label(new), note))

    def selected(owner: str, fname: str, kind: str) -> bool:
        if not op.sites:
            chosen = kind == op.source
        else:
            named = [s for s, (module, functional, _) in sites.items() if functional and module == owner]
            chosen = pick((f"{owner}.{fname}", f"function:{owner or '<root>'}.{fname}", kind, f"kind:{kind}", *named))
        if chosen and kind == target_kind and op.negative_slope is None:  # with a slope: the old one is unknown
            acc.notes.append(f"{owner or '<root>'}: functional {fname} already is {kind}")
            return False
        return chosen

    model, swaps = swap_functional(model, op, selected)
    acc.not_patched += [f"--select {p!r} matched no activation module or traceable functional call" for p in pick.unused()]
    for s in swaps:
        acc.swapped += [f"function:{s.module or '<root>'}.{line.partition(' -> ')[0]}" for line in s.swapped]
    _record_functional(swaps, acc, trace_errors)
    return model


def _record_functional(swaps: Sequence[FunctionalSwap], acc: RecordBuilder, trace_errors: dict[str, str]) -> None:
    for s in swaps:
        if s.error is not None:
            trace_errors[s.module] = s.error
        for line in dict.fromkeys(s.swapped):
            count = s.swapped.count(line)
            before, _, after = line.partition(" -> ")
            where = s.module or "<root>"
            acc.changes.append(Change(f"{where}: functional {before}" + (f" (x{count})" if count > 1 else ""),
                                      before, after, "rewritten with torch.fx"))  # fmt: skip


def _device_of(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


def _label(m: nn.Module) -> str:
    spec = spec_for_module(m)
    return spec.label if spec is not None else type(m).__name__


def _check_swapped(model: nn.Module, op: SwapActivation, example: Any, run: Forward,
                   trace_errors: Mapping[str, str], acc: RecordBuilder) -> None:  # fmt: skip
    """Audit the patched model on ``example``: selected sites still of the old kind were not patched."""
    report = _audit_one(model, example, run)
    for name, site in report.sites.items():
        if site.kind == REPLACEMENTS[op.to].kind.value:
            continue
        wanted = site.kind == op.source if not op.sites else matches((name, site.module, site.kind, f"kind:{site.kind}"), op.sites)
        if not wanted:
            continue
        where = site.module or "<root>"
        reason = trace_errors.get(site.module)
        why = f"torch.fx cannot trace {where}.forward ({reason})" if reason else f"in {where}, not reachable by module surgery or fx"
        acc.not_patched.append(f"{name} ({site.kind}{', functional' if site.functional else ''}): {why}")


def _audit_one(model: nn.Module, example: Any, run: Forward) -> Report:
    return audit_batches(model, [example], run)


def audit_batches(model: nn.Module, batches: Sequence[Any], forward: Forward | None = None) -> Report:
    """An eager measurement of ``model`` on ``batches`` (no findings), each fed by ``forward`` (default:
    the audit's own)."""
    return measure(model, batches, forward=forward, compile=False, distributed=False).report


class DropoutHook:
    """A forward hook that applies dropout to a module's output in training mode (re-made by load_patched)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: Any, out: Any) -> Any:
        return F.dropout(out, self.p, module.training) if isinstance(out, torch.Tensor) else out


_CONV_OR_NORM = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Identity)


def _insert_dropout(model: nn.Module, op: InsertDropout, report: Any, acc: RecordBuilder) -> None:
    names = dict(model.named_modules())
    targets: list[str] = []
    for name, m in names.items():
        spec = spec_for_module(m)
        if spec is None:
            continue
        if op.after:
            chosen = matches((name, f"module:{name}", spec.kind.value, f"kind:{spec.kind.value}"), op.after)
        else:
            if report is None:
                raise PatchError(f"{op.describe()}: finding the activations between conv layers needs an audit "
                                 "report of the model (pass report=..., or data on the command line)")  # fmt: skip
            producers = [s.producer for s in report.sites.values() if s.module == name and not s.functional]
            chosen = any(p is not None and isinstance(names.get(p), _CONV_OR_NORM) for p in producers)
        if chosen:
            targets.append(name)
    if not targets:
        acc.not_patched.append(f"{op.describe()}: no activation module matches")
    for name in targets:
        names[name].register_forward_hook(DropoutHook(op.p))
        acc.dropped.append(f"module:{name}")
        acc.changes.append(Change(name, "no dropout", f"dropout p={op.p:g} after it",
                                  "a forward hook, active in training mode only"))  # fmt: skip


def _add_batchnorm(model: nn.Module, op: AddBatchNorm, report: Any, example: Any, run: Forward,
                   acc: RecordBuilder) -> None:  # fmt: skip
    from deadneuron.patch.batchnorm import LAYER_PREFIX, add_batchnorm

    needs_sites = not op.sites or any(not p.startswith(LAYER_PREFIX) for p in op.sites)
    if report is None and needs_sites and example is not None:
        report = _audit_one(model, example, run)  # which layer feeds which site
    add_batchnorm(model, op, report, acc)


def _reinit(model: nn.Module, op: ReinitDead, report: Any, example: Any, run: Forward, seed: int,
            acc: RecordBuilder) -> tuple[Any, ...]:  # fmt: skip
    from deadneuron.patch.reinit import dataflow, reinit_dead

    if op.channels is not None:
        channels = {site: ids for site, ids in op.channels}
    elif report is not None:
        channels = {name: s.dead_channels for name, s in report.sites.items() if s.dead_channels and (
                    not op.sites or matches((name, s.module, f"module:{s.module}", s.kind, f"kind:{s.kind}"), op.sites))}
    else:
        raise PatchError("re-initialising dead channels needs to know which are dead: pass an audit report")
    if not channels:
        acc.notes.append("no dead channels to re-initialise")
        return ()
    if example is None:
        raise PatchError("re-initialising dead channels needs an example batch to find the layers around them")
    flow = dataflow(model, lambda m: run(m, example))
    result = reinit_dead(model, channels, flow, seed=seed)
    acc.changes += [Change(layer, "dead channels", what) for layer, what in result.changed]
    acc.notes += result.missing
    return tuple(result.slices)


__all__ = [
    "ApplyRecord",
    "Change",
    "DropoutHook",
    "PatchError",
    "PatchResult",
    "apply_plan",
    "audit_batches",
    "make_activation",
]
