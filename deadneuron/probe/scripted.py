"""TorchScript functions a model's code calls (DESIGN section 3: "unknown activations are never skipped silently").

A function compiled with ``@torch.jit.script`` (a fused bias-GELU, a scripted activation) runs as TorchScript:
the functional probe sees the call of no torch function inside it, so an activation it computes is not
measured. `script_functions` finds, once per module class, the TorchScript functions its methods refer to by
a global name (the form such helpers take: defined at module level, called from ``forward``), with the
activation functions their graphs call (nested scripted calls inlined), for a warning that names them. A
scripted function reached only through other Python helpers, or passed in as an argument, is not found.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from deadneuron.functional_kinds import FunctionalActivations

ScriptCalls = tuple[tuple[str, tuple[str, ...]], ...]  # (function name, activations inside it)


@functools.cache
def _activation_names() -> frozenset[str]:
    """The names of the torch functions the probe measures as activations (``relu``, ``gelu``, ``tanh``...)."""
    return frozenset(FunctionalActivations.site_name(f).rstrip("_") for f in FunctionalActivations(None).makers())


_FOUND: weakref.WeakKeyDictionary[type, ScriptCalls] = weakref.WeakKeyDictionary()  # per class, while it lives


def script_functions(cls: type) -> ScriptCalls:
    """The TorchScript functions that the methods of module class ``cls`` (its own and its bases' outside
    torch) name as globals, each with the activations its graph calls; those that call none are left out.
    Found once per class (asked for every module of every audit)."""
    calls = _FOUND.get(cls)
    if calls is None:
        calls = _FOUND[cls] = _scan(cls)
    return calls


def _scan(cls: type) -> ScriptCalls:
    found: dict[str, tuple[str, ...]] = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for attr in vars(klass).values():
            fn = getattr(attr, "__func__", attr)
            code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
            if not isinstance(code, types.CodeType) or not isinstance(scope, dict):
                continue
            for name in _global_names(code):
                obj = scope.get(name)
                if isinstance(obj, torch.jit.ScriptFunction) and name not in found:
                    found[name] = _graph_activations(obj)
    return tuple((name, acts) for name, acts in found.items() if acts)


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The names ``code`` and the code nested in it (comprehensions, lambdas, inner functions) look up."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _graph_activations(fn: Any) -> tuple[str, ...]:  # a torch.jit.ScriptFunction
    try:
        graph = fn.inlined_graph
    except RuntimeError:  # a graph torch cannot inline: its own calls only
        graph = fn.graph
    kinds = {node.kind().partition("::")[2].rstrip("_") for node in graph.nodes()}
    return tuple(sorted(kinds & _activation_names()))
