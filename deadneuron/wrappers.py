"""Models inside wrappers: `DistributedDataParallel`, `DataParallel` and `torch.compile`.

A wrapper adds a level to every module name (``module.`` for the data-parallel wrappers,
``_orig_mod.`` for a compiled module) that the user never wrote, and a compiled module runs its
forward inside dynamo, where forward hooks cannot run. `unwrap` peels the wrappers off the top of a
model: the audit runs the module the user built, under its own names, on the same weights (DDP's
forward adds only gradient and buffer synchronisation; a compiled graph computes what the eager
module computes). `user_named_modules` gives the names of a model with wrappers nested inside it,
which `eager` lets run without compiling while an audit is hooked into them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from types import MappingProxyType

from torch import nn

# The attribute under which each wrapper keeps the module it wraps.
_INNER = MappingProxyType({"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod"})


def wrapped(module: nn.Module) -> nn.Module | None:
    """The module ``module`` wraps, or None when it is no wrapper."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = module.module
        return inner if isinstance(inner, nn.Module) else None
    compiled = _optimized_module_type()
    if compiled is not None and isinstance(module, compiled):
        inner = module._orig_mod
        return inner if isinstance(inner, nn.Module) else None
    return None


def _optimized_module_type() -> type | None:
    """torch.compile's wrapper class, if torch.compile has been used in this process (no import else)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(frame, "OptimizedModule", None) if frame is not None else None


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside the wrappers at the top of ``model``, and a note per wrapper taken off."""
    notes = []
    inner = wrapped(model)
    while inner is not None:
        kind = type(model).__name__
        how = ("its forward runs in a compiled graph, where hooks cannot run; the eager module computes the same"
               if kind == "OptimizedModule" else f"{kind} adds only synchronisation to its forward")
        notes.append(f"audited the module inside {kind} under its own names (no '{_INNER[kind]}.' prefix): {how}")
        model, inner = inner, wrapped(inner)
    return model, notes


def user_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the wrappers nested in it: a wrapper's inner module takes the
    wrapper's name (``encoder`` for ``encoder._orig_mod``), its submodules follow from there, and the
    wrapper itself is left out. A module reached twice is named once, at its first name (as in
    ``named_modules``)."""
    yield from _named(model, "", set())


def _named(module: nn.Module, name: str, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    inner = wrapped(module)
    if inner is not None:
        yield from _named(inner, name, seen)
        return
    if id(module) in seen:
        return
    seen.add(id(module))
    yield name, module
    for child_name, child in module.named_children():
        yield from _named(child, f"{name}.{child_name}" if name else child_name, seen)


def has_compiled(model: nn.Module) -> bool:
    compiled = _optimized_module_type()
    return compiled is not None and any(isinstance(m, compiled) for m in model.modules())


def eager(model: nn.Module) -> AbstractContextManager[object]:
    """Compiled submodules of ``model`` run eagerly (``torch.compiler.set_stance("force_eager")``) while
    this is entered, so that an audit's hooks run inside them; a no-op for a model without any."""
    if not has_compiled(model):
        return nullcontext()
    import torch

    return torch.compiler.set_stance("force_eager")
