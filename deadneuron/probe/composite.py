"""An activation written out of another one's torch call: ``x * torch.sigmoid(x)`` is SiLU, not a sigmoid.

SiLU (swish: the ``nonlinearity`` of the DDPM, LDM and VQGAN UNets, timm's ``Swish``) is linear where x is
large, while a sigmoid is flat there: measured as the sigmoid it calls, a channel whose input stays above 4.4
reads dead although it passes its input and its gradient through unchanged. So a sigmoid call is measured
only once the next thing the forward pass does shows what it was (`FunctionalProbe` holds it as `Pending`):

* the next torch call multiplies the sigmoid's output by the sigmoid's own input (``x * s``, ``s * x``,
  ``x.mul(s)``, ``torch.mul``, timm's in-place ``x.mul_(s)``): one SiLU site, its pre-activation the
  sigmoid's input and its output the product, named ``silu`` and labelled as written;
* anything else (another torch call, a module's hook, the end of the forward pass): the sigmoid site it
  always was, measured before that runs, so nothing can have changed its input or output in between.

``x * torch.sigmoid(beta * x)`` (QuickGELU, with beta 1.702, as CLIP writes it) is taken too, where the sigmoid's
input is the product of x and a number made by the call just before it (`Scaled`): its site is named ``swish``
and its kind ``x*sigmoid(1.702x)``, with the flat region derived from that function like any other. Only these
exact forms are taken: the same function written another way (``x / (1 + torch.exp(-x))``) is no site at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from deadneuron.activations import ActivationKind, ActivationSpec, CustomActivation

T = torch.Tensor

SWISH = ActivationSpec(ActivationKind.SILU, (("written", "x*sigmoid(x)"),))
SWISH_NAME = "silu"

_MULS = frozenset({torch.mul, torch.multiply, T.mul, T.multiply, T.__mul__, T.__rmul__})
_MULS_INPLACE = frozenset({T.mul_, T.multiply_, T.__imul__})  # they write into their first operand


SCALES = frozenset({torch.mul, T.mul, T.__mul__, T.__rmul__})
SIGMOIDS = frozenset({torch.sigmoid, T.sigmoid, torch.nn.functional.sigmoid, torch.special.expit})


@dataclass(frozen=True, slots=True)
class Scaled:
    """The product ``out`` of a tensor ``x`` and a number ``beta``, made by the call just before this one."""

    out: torch.Tensor
    x: torch.Tensor
    beta: float


def scaled(func: Any, args: tuple[Any, ...], kwargs: Any, out: Any) -> Scaled | None:
    """``out = func(*args)`` as a `Scaled` where it multiplies a tensor by a plain number, else None."""
    if func not in SCALES or kwargs or len(args) != 2 or type(out) is not torch.Tensor:
        return None
    a, b = args
    x, beta = (a, b) if isinstance(a, torch.Tensor) else (b, a)
    if not isinstance(x, torch.Tensor) or not isinstance(beta, Real) or isinstance(beta, bool) or not float(beta) > 0:
        return None
    return Scaled(out, x, float(beta))


@dataclass(frozen=True, slots=True)
class Pending:
    """A sigmoid call made and not yet measured: its spec, site name, input and output, and the tensor ``x``
    and number ``beta`` whose product its input was (else its input and 1)."""

    spec: ActivationSpec
    name: str
    z: torch.Tensor
    out: torch.Tensor
    x: torch.Tensor
    beta: float = 1.0

    def swish(self) -> tuple[ActivationSpec, str]:
        """The spec and site name of x * sigmoid(beta * x)."""
        return (SWISH, SWISH_NAME) if self.beta == 1.0 else (scaled_swish(self.beta), "swish")


@functools.cache
def scaled_swish(beta: float) -> ActivationSpec:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(beta * x)

    return ActivationSpec(ActivationKind.CUSTOM, custom=CustomActivation(f"x*sigmoid({beta:g}x)", fn))


def defers(spec: ActivationSpec, inplace: bool) -> bool:
    """Whether a functional call of ``spec`` waits for the next call to be measured: a plain sigmoid not
    in place (an in-place one leaves no input to take as SiLU's)."""
    return spec.kind is ActivationKind.SIGMOID and spec.custom is None and not inplace


def swish(pending: Pending, func: Any, args: tuple[Any, ...], kwargs: Any) -> bool | None:
    """Whether ``func(*args)`` makes ``pending`` a SiLU: None where it does not, else whether it writes
    the product into the sigmoid's input (``x.mul_(s)``: the flat count must be read before it runs)."""
    if kwargs or len(args) != 2:
        return None
    a, b = args
    z, out = pending.x, pending.out
    if not ((a is z and b is out) or (a is out and b is z)):
        return None
    if among(func, _MULS):
        return False
    if among(func, _MULS_INPLACE):
        return a is z
    return None


def among(func: Any, funcs: frozenset[Any]) -> bool:
    """``func in funcs``, False for an unhashable callable (not one of torch's)."""
    try:
        return func in funcs
    except TypeError:
        return False
