"""Activation kinds a user declares: `register_activation` and the `ActivationRegistry` an audit reads.

    class MyAct(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(2 * x)

    handle = deadneuron.register_activation(MyAct, lambda z: z * torch.sigmoid(2 * z))
    report = deadneuron.audit(model, batches)      # every MyAct is a site of kind "MyAct"
    handle.remove()                                # or: with deadneuron.register_activation(...):

A target is an ``nn.Module`` subclass (every instance, subclasses included, is a site; the probe does
not look inside it), or a torch-level function called in ``forward`` (``torch.sin``, ``torch.Tensor.sin``,
a ``torch.nn.functional`` function): those reach the functional probe. A plain Python function of
your own never does (the probe sees the torch calls inside it, not the function): wrap it in an
``nn.Module`` and register that. ``fn`` is the *elementwise* function whose derivative defines the flat
region, derived as for the built-in kinds; for a module type it defaults to a fresh instance built
without arguments (pass ``fn`` where the constructor needs arguments or the instances' parameters
change the function).

The registry is explicit state: `audit` reads `default_registry` (the one `register_activation`
writes) unless it is given ``activations=`` another `ActivationRegistry`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deadneuron.activations import (
    ActivationKind,
    ActivationSpec,
    CustomActivation,
    flat_region,
    spec_for_module,
)
from deadneuron.errors import UsageError
from deadneuron.known_modules import known_spec

_TORCH_CALLABLES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
)


def _is_torch_function(target: Any) -> bool:
    """A function the functional probe can see: a builtin, a tensor method or a Python function of torch."""
    if isinstance(target, _TORCH_CALLABLES):
        return True
    module = str(getattr(target, "__module__", "") or "")
    return module == "torch" or module.startswith("torch.")


def _label(target: Any) -> str:
    return str(getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or target)


@dataclass(eq=False)
class RegistrationHandle:
    """Undoes one `ActivationRegistry.register`: ``remove()`` (idempotent) or leave its ``with`` block."""

    registry: ActivationRegistry
    target: Any
    entry: CustomActivation

    def remove(self) -> None:
        self.registry.unregister(self.target, self.entry)

    def __enter__(self) -> RegistrationHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ActivationRegistry:
    """Module types and torch functions declared as activation kinds, each with its function."""

    def __init__(self) -> None:
        self._modules: dict[type[nn.Module], CustomActivation] = {}
        self._functions: dict[Any, CustomActivation] = {}

    def register(
        self,
        target: type[nn.Module] | Callable[..., Any],
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        name: str | None = None,
    ) -> RegistrationHandle:
        """Declare ``target`` an activation computing ``fn`` elementwise; see the module doc.

        Registering a target again replaces its entry (the older handle then removes nothing).
        Raises UsageError for a target the probe cannot see or a function it cannot differentiate.
        """
        module_type: type[nn.Module] | None = None
        function: Callable[[torch.Tensor], torch.Tensor]
        if isinstance(target, type) and issubclass(target, nn.Module):
            module_type = target
            function = fn if fn is not None else _fresh_instance(target)
        else:
            torch_function = _torch_function(target)
            function = fn if fn is not None else torch_function
        if not callable(function):
            raise UsageError(
                f"register_activation({_label(target)}): fn must be callable, got {type(function).__name__}"
            )
        entry = CustomActivation(name or str(getattr(target, "__name__", _label(target))), function)
        _check_differentiable(target, entry)
        if module_type is not None:
            self._modules[module_type] = entry
        else:
            self._functions[target] = entry
        return RegistrationHandle(self, target, entry)

    def unregister(self, target: Any, entry: CustomActivation | None = None) -> None:
        """Forget ``target`` (only if its entry is still ``entry``, when given). Idempotent."""
        for table in (self._modules, self._functions):
            if target in table and (entry is None or table[target] is entry):
                del table[target]

    def module_spec(self, m: nn.Module) -> ActivationSpec | None:
        """The registered kind of module ``m`` (latest registration first), or None."""
        for cls, entry in reversed(self._modules.items()):
            if isinstance(m, cls):
                return ActivationSpec(ActivationKind.CUSTOM, custom=entry)
        return None

    def spec_for_module(self, m: nn.Module) -> ActivationSpec | None:
        """What module ``m`` computes: a registered kind first, else a built-in one (or one of another library's
        modules that computes a built-in kind: `deadneuron.known_modules`), else None."""
        return self.module_spec(m) or spec_for_module(m) or known_spec(m)

    def functions(self) -> Mapping[Any, CustomActivation]:
        """The registered torch functions (a copy)."""
        return dict(self._functions)

    def __len__(self) -> int:
        return len(self._modules) + len(self._functions)

    def __contains__(self, target: object) -> bool:
        return target in self._modules or target in self._functions


def _torch_function(target: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """``target`` checked to be a torch function the probe sees (see the module doc)."""
    if isinstance(target, nn.Module):
        raise UsageError(
            f"register_activation takes the module's class, not an instance: register_activation({type(target).__name__}, fn)"
        )
    if not callable(target):
        raise UsageError(f"register_activation: {target!r} is neither an nn.Module subclass nor a function")
    if not _is_torch_function(target):
        raise UsageError(
            f"register_activation({_label(target)}): a Python function of your own is never seen by the probe "
            "(it sees the torch calls inside it); wrap it in an nn.Module subclass and register that, "
            "or register the torch function it calls"
        )
    return target


def _fresh_instance(target: type[nn.Module]) -> nn.Module:
    try:
        return target()
    except Exception as exc:
        raise UsageError(
            f"register_activation({target.__name__}): cannot build {target.__name__}() without arguments "
            f"({type(exc).__name__}: {exc}); pass fn, its elementwise function"
        ) from exc


def _check_differentiable(target: Any, entry: CustomActivation) -> None:
    """Derive the region once now, so that a bad ``fn`` fails here rather than mid-audit."""
    try:
        flat_region(ActivationSpec(ActivationKind.CUSTOM, custom=entry), 0.05)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"register_activation({_label(target)}): cannot derive the flat region of its function "
            f"on a 1-D float64 tensor ({type(exc).__name__}: {first}); pass fn, an elementwise differentiable function"
        ) from exc


default_registry = ActivationRegistry()  # the one audit reads unless given activations=


def register_activation(
    target: type[nn.Module] | Callable[..., Any],
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    name: str | None = None,
) -> RegistrationHandle:
    """Declare ``target`` (an nn.Module subclass or a torch function) an activation in `default_registry`.

    ``fn`` is its elementwise function (the flat region is derived from it); ``name`` its kind in
    reports (default: the class or function name). Returns a handle: ``.remove()``, or use it in
    ``with``. See `deadneuron.registry` for what the probe can and cannot see.
    """
    return default_registry.register(target, fn, name=name)


__all__ = ["ActivationRegistry", "RegistrationHandle", "default_registry", "register_activation"]
