"""Models inside wrappers: `DistributedDataParallel`, `DataParallel`, `torch.compile`, FSDP and activation
checkpointing.

A wrapper adds a level to every module name (``module.`` for the data-parallel wrappers,
``_orig_mod.`` for a compiled module, ``_fsdp_wrapped_module.`` for FSDP's FullyShardedDataParallel,
``_checkpoint_wrapped_module.`` for torch's checkpoint wrapper) that the user never wrote, and a
compiled module runs its forward inside dynamo, where forward hooks cannot run. `unwrap` peels the
data-parallel and compile wrappers off the top of a model: the audit runs the module the user built,
under its own names, on the same weights (DDP's forward adds only gradient and buffer synchronisation;
a compiled graph computes what the eager module computes). FSDP and checkpoint wrappers stay: their
forward is needed (FSDP gathers the sharded parameters there), so only their names go.
`user_named_modules` gives the names of a model with any of these wrappers nested inside it, which
`eager` lets run without compiling while an audit is hooked into them. FSDP2 (``fully_shard``) keeps
the module names; its parameters are sharded tensors, which `full_parameters` gathers for code that
reads weights (the rules), as FSDP's parameters are only whole inside its forward.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from types import MappingProxyType
from typing import Any

from torch import nn

# The attribute under which each wrapper keeps the module it wraps.
_INNER = MappingProxyType({"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod"})
# Wrappers whose forward must run, found by class where torch has loaded it: (module, class, attribute).
_RENAMED = (
    ("torch.distributed.fsdp", "FullyShardedDataParallel", "_fsdp_wrapped_module"),
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper", "_checkpoint_wrapped_module"),
)


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
    return _loaded("torch._dynamo.eval_frame", "OptimizedModule")


def _loaded(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that module is imported (a model cannot hold one otherwise)."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def renamed(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(the wrapper's class name, the module it wraps) for an FSDP or checkpoint wrapper, whose forward
    runs but whose name level goes; None for any other module."""
    for where, cls_name, attr in _RENAMED:
        cls = _loaded(where, cls_name)
        if cls is not None and isinstance(module, cls):
            inner = getattr(module, attr, None)
            if isinstance(inner, nn.Module):
                return type(module).__name__, inner
    return None


def wrapper_notes(model: nn.Module) -> list[str]:
    """One note per kind of FSDP or checkpoint wrapper inside ``model`` (their names left out), and for
    FSDP2-sharded modules."""
    kinds = dict.fromkeys(found[0] for m in model.modules() if (found := renamed(m)) is not None)
    notes = [f"audited the modules inside {kind} under their own names (no '{_attr(kind)}.' prefix); its "
             "forward runs as in training" for kind in kinds]  # fmt: skip
    if _sharded2(model):
        notes.append("FSDP2-sharded modules (fully_shard): measured in their forward; the rules read the "
                     "parameters gathered whole (every rank takes part)")  # fmt: skip
    return notes


def _attr(kind: str) -> str:
    return "_fsdp_wrapped_module" if kind == "FullyShardedDataParallel" else "_checkpoint_wrapped_module"


def _sharded2(model: nn.Module) -> list[Any]:
    """The FSDP2 (``fully_shard``) modules of ``model``."""
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    return [m for m in model.modules() if isinstance(m, cls)] if cls is not None else []


def sharded(model: nn.Module) -> bool:
    """``model`` holds FSDP-sharded modules (FullyShardedDataParallel, or FSDP2's ``fully_shard``)."""
    fsdp1 = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    return bool(_sharded2(model)) or (fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()))


def gradients_off(model: nn.Module, grad: bool = False) -> AbstractContextManager[object]:
    """``torch.inference_mode``, or ``torch.no_grad`` for an FSDP-sharded model (FSDP keeps the parameters
    it gathers, and tensors made in inference mode cannot be used outside it) or with ``grad`` (a model that
    computes gradients in its forward: inference mode forbids them even under ``torch.enable_grad``)."""
    import torch

    return torch.no_grad() if grad or sharded(model) else torch.inference_mode()


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """While entered, every parameter of an FSDP-sharded ``model`` is whole on this rank (FSDP's
    ``summon_full_params``, FSDP2's ``unshard``; resharded on exit, unchanged). A collective where the
    model is sharded: every rank enters it; a no-op for any other model."""
    fsdp1 = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    with ExitStack() as stack:
        if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
            stack.enter_context(fsdp1.summon_full_params(model, writeback=False))  # type: ignore[attr-defined]
        units = _sharded2(model)
        for unit in units:
            unit.unshard()
            stack.callback(unit.reshard)
        yield


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
    """``model.named_modules()`` without the wrappers nested in it (data-parallel, compile, FSDP and
    checkpoint wrappers): a wrapper's inner module takes the wrapper's name (``encoder`` for
    ``encoder._orig_mod`` or ``encoder._fsdp_wrapped_module``), its submodules follow from there, and the
    wrapper itself is left out. A module reached twice is named once, at its first name (as in
    ``named_modules``)."""
    yield from _named(model, "", set())


def _named(module: nn.Module, name: str, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    found = renamed(module)
    inner = wrapped(module) if found is None else found[1]
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
