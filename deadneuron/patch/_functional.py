"""Swapping functional activations (``F.relu(x)``, ``torch.relu``, ``x.relu()``) with torch.fx.

Each module's *own* ``forward`` is traced on its own, with every child a leaf, so a module whose code
cannot be traced (data-dependent control flow, say) costs only the functional calls in its own code:
its children are still visited, and what could not be traced is reported with fx's reason. A rewritten
module becomes a ``GraphModule`` holding the same children, parameters and buffers under the same names,
so its ``state_dict`` keys do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from deadneuron.functional_kinds import FunctionalActivations
from deadneuron.ops import SwapActivation
from deadneuron.replacements import REPLACEMENTS

NodeFilter = Callable[[str, str, str], bool]  # (owner module name, function name, kind) -> selected?


@dataclass(frozen=True)
class FunctionalSwap:
    """What happened to the functional activations in one module's own code."""

    module: str
    swapped: tuple[str, ...] = ()  # "relu -> leaky_relu" per rewritten call
    error: str | None = None  # why the module's forward could not be traced


class _OwnCodeTracer(fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf (called, never traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _function_of(node: fx.Node) -> Any:
    if node.op == "call_function":
        return node.target
    if node.op == "call_method" and isinstance(node.target, str):
        return getattr(torch.Tensor, node.target, None)
    return None


def _is_inplace(func: Any, node: fx.Node) -> bool:
    return FunctionalActivations.name(func) != getattr(func, "__name__", "") or bool(node.kwargs.get("inplace"))


def own_code_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules whose forward is user code (not torch.nn's own), deepest first, the root last."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if not type(m).__module__.startswith("torch.") or name == ""
    ]
    yield from reversed(found)


def swap_functional(model: nn.Module, op: SwapActivation, selected: NodeFilter) -> tuple[nn.Module, list[FunctionalSwap]]:
    """``model`` with the selected functional activations replaced; what was done per module.

    Mutates ``model`` (call it on a copy). Returns the root, which is a new GraphModule where the root's
    own code was rewritten.
    """
    lookup = FunctionalActivations()
    results: list[FunctionalSwap] = []
    root = model
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    for name, module in list(own_code_modules(model)):
        try:
            graph = _OwnCodeTracer().trace(module)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
            results.append(FunctionalSwap(name, error=_one_line(exc)))
            continue
        new_children: dict[str, nn.Module] = {}
        swapped = _rewrite(graph, name, op, selected, lookup, new_children, device)
        if not swapped:
            continue
        rewritten = _graph_module(module, graph, new_children)
        if name == "":
            root = rewritten
        else:
            replace_module(model, module, rewritten)
        results.append(FunctionalSwap(name, tuple(swapped)))
    return root, results


def _rewrite(graph: fx.Graph, owner: str, op: SwapActivation, selected: NodeFilter,
             lookup: FunctionalActivations, new_children: dict[str, nn.Module], device: torch.device) -> list[str]:  # fmt: skip
    swapped: list[str] = []
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        func = _function_of(node)
        spec = lookup.spec(func, tuple(node.args), dict(node.kwargs)) if func is not None else None
        if spec is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        fname = FunctionalActivations.name(func)
        if not selected(owner, fname, spec.kind.value):
            continue
        x = node.args[0]
        inplace = _is_inplace(func, node)
        with graph.inserting_after(node):
            target = REPLACEMENTS[op.to]
            if target.function is None:  # a module only (PReLU: it has a weight)
                child = f"patched_{op.to}_{len(new_children)}"
                new_children[child] = target.module().to(device)
                new = graph.call_module(child, (x,))
            else:
                fn, kwargs = target.call(negative_slope=op.negative_slope, inplace=inplace)
                new = graph.call_function(fn, (x,), kwargs)
        node.replace_all_uses_with(new)
        if inplace:  # later readers of x saw the activated values: give them the new result
            _redirect_later_uses(x, new, after=order[node], order=order)
        graph.erase_node(node)
        swapped.append(f"{fname} -> {op.to}")
    graph.lint()
    return swapped


def _redirect_later_uses(x: fx.Node, new: fx.Node, *, after: int, order: dict[fx.Node, int]) -> None:
    """Readers of ``x`` that run after an in-place activation read ``new`` instead."""
    x.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and order.get(user, -1) > after)


def _graph_module(module: nn.Module, graph: fx.Graph, new_children: dict[str, nn.Module]) -> fx.GraphModule:
    """A GraphModule over ``graph`` that keeps every child, parameter and buffer of ``module``."""
    for name, child in new_children.items():
        module.add_module(name, child)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        if not hasattr(gm, name):
            gm.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    non_persistent: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if name not in gm._buffers:
            gm.register_buffer(name, buf, persistent=name not in non_persistent)
    gm.train(module.training)
    return gm


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Point every attribute that holds ``old`` (a shared module may sit under several) at ``new``."""
    places: list[str] = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=True)):
        for attr, child in list(parent._modules.items()):
            if child is old:
                parent._modules[attr] = new
                places.append(f"{parent_name}.{attr}" if parent_name else attr)
    return places


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else f"{text[:197]}..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["FunctionalSwap", "replace_module", "swap_functional"]
