"""Activation modules of other libraries whose forward writes a built-in kind out of other torch calls.

Hugging Face GPT-2's ``NewGELUActivation`` computes GELU's tanh approximation as
``0.5 * x * (1 + torch.tanh(...))``: the probe would see only its ``torch.tanh``, whose flat region (both
tails) is not GELU's (the left tail only), so a channel whose input stays high would read saturated. These
classes are measured as the function they compute, as an ``nn.GELU`` is. A class is matched by its module
and name and only while its ``forward`` is that class's own (a hub kernel swapped in, or a subclass that
overrides it, computes something else: it is left to the probe and the warnings). The functions are those
of transformers' ``activations`` module (read in transformers 5.24).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deadneuron.activations import ActivationKind, ActivationSpec
from deadneuron.probe.composite import scaled_swish

_GELU = ActivationSpec(ActivationKind.GELU, (("approximate", "none"),))
_TANH_GELU = ActivationSpec(ActivationKind.GELU, (("approximate", "tanh"),))
_MISH = ActivationSpec(ActivationKind.MISH)
_SILU = ActivationSpec(ActivationKind.SILU)


def _always(spec: ActivationSpec) -> Callable[[nn.Module], ActivationSpec | None]:
    return lambda m: spec


def _if_python(method: str, spec: ActivationSpec) -> Callable[[nn.Module], ActivationSpec | None]:
    """Where ``m.act`` is the class's own Python version (else it is a torch function the probe measures)."""

    def spec_of(m: nn.Module) -> ActivationSpec | None:
        act = getattr(m, "act", None)
        return spec if getattr(act, "__func__", None) is getattr(type(m), method, None) else None

    return spec_of


_HF = "transformers.activations"
_KNOWN: dict[tuple[str, str], Callable[[nn.Module], ActivationSpec | None]] = {
    (_HF, "NewGELUActivation"): _always(_TANH_GELU),  # gelu_new (GPT-2)
    (_HF, "FastGELUActivation"): _always(_TANH_GELU),  # gelu_fast: the same function, factored
    (_HF, "AccurateGELUActivation"): _always(_TANH_GELU),  # gelu_accurate
    (_HF, "GELUActivation"): _if_python("_gelu_python", _GELU),  # gelu_python: written with torch.erf
    (_HF, "GELUTanh"): _if_python("_gelu_tanh_python", _TANH_GELU),  # gelu_python_tanh
    (_HF, "MishActivation"): _if_python("_mish_python", _MISH),
    (_HF, "QuickGELUActivation"): _always(scaled_swish(1.702)),  # quick_gelu (CLIP): x * sigmoid(1.702 x)
    (_HF, "SiLUActivation"): _always(_SILU),  # F.silu: measured as a module, also where no batch calls it
}


def known_spec(m: nn.Module) -> ActivationSpec | None:
    """The built-in kind a known third-party activation module computes, or None."""
    cls = type(m)
    spec_of = _KNOWN.get((cls.__module__, cls.__qualname__))
    if spec_of is None or getattr(cls.forward, "__qualname__", "") != f"{cls.__qualname__}.forward":
        return None
    return spec_of(m)
