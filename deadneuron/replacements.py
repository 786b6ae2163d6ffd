"""The activations a patch swaps in: one registry of their names (the ``--activation`` word, also the value
of an adapter config's activation keys), the other names they go by, the kind each measures as
(`deadneuron.activations.ActivationKind`), and how to make each as a module or as a functional call.

    replacement("LeakyReLU").name                 # "leaky"
    REPLACEMENTS["leaky"].module(negative_slope=0.1, inplace=True)
    kind_of("leaky")                               # "leaky_relu", as reports name it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from deadneuron.activations import ActivationKind
from deadneuron.errors import UsageError

SwapName = Literal["relu", "leaky", "gelu", "elu", "silu", "prelu"]
SWAP_NAMES: tuple[SwapName, ...] = get_args(SwapName)
DEFAULT_SLOPE = 0.01  # LeakyReLU's, where neither the plan nor the config sets one


@dataclass(frozen=True)
class Replacement:
    """One activation a patch can swap in. ``function`` is None for one that only exists as a module
    (PReLU: it has a weight)."""

    name: SwapName
    kind: ActivationKind
    module_type: type[nn.Module]
    function: Callable[..., torch.Tensor] | None
    aliases: tuple[str, ...] = ()
    takes_slope: bool = False
    takes_inplace: bool = False

    def _keywords(self, negative_slope: float | None, inplace: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.takes_slope:
            out["negative_slope"] = negative_slope if negative_slope is not None else DEFAULT_SLOPE
        if self.takes_inplace:
            out["inplace"] = inplace
        return out

    def module(self, *, negative_slope: float | None = None, inplace: bool = False) -> nn.Module:
        """A fresh module (``inplace`` where the kind has the flag)."""
        return self.module_type(**self._keywords(negative_slope, inplace))

    def call(self, *, negative_slope: float | None = None, inplace: bool = False) -> tuple[Callable[..., Any], dict[str, Any]]:
        """The functional form and its keyword arguments (``inplace`` where the function has it)."""
        if self.function is None:
            raise ValueError(f"{self.name} has no functional form: swap in its module")
        return self.function, self._keywords(negative_slope, inplace)


_ALL = (
    Replacement("relu", ActivationKind.RELU, nn.ReLU, F.relu, takes_inplace=True),
    Replacement("leaky", ActivationKind.LEAKY_RELU, nn.LeakyReLU, F.leaky_relu, ("leaky_relu", "leakyrelu"),
                takes_slope=True, takes_inplace=True),  # fmt: skip
    Replacement("gelu", ActivationKind.GELU, nn.GELU, F.gelu),
    Replacement("elu", ActivationKind.ELU, nn.ELU, F.elu, takes_inplace=True),
    Replacement("silu", ActivationKind.SILU, nn.SiLU, F.silu, ("swish",), takes_inplace=True),
    Replacement("prelu", ActivationKind.PRELU, nn.PReLU, None),
)
REPLACEMENTS: Mapping[str, Replacement] = MappingProxyType({r.name: r for r in _ALL})
_BY_NAME: Mapping[str, Replacement] = MappingProxyType(
    {name: r for r in _ALL for name in (r.name, r.kind.value, *r.aliases)}
)


def replacement(text: str) -> Replacement:
    """The replacement ``text`` names (``"leaky"``, ``"leaky_relu"``, ``"LeakyReLU"``...); a UsageError
    listing the names otherwise."""
    found = _BY_NAME.get(text.strip().lower())
    if found is None:
        raise UsageError(f"--activation {text!r}: not one of {', '.join(SWAP_NAMES)}")
    return found


def kind_of(name: str) -> str:
    """The kind an activation name measures as (``"leaky"`` -> ``"leaky_relu"``); a name that is no
    replacement is returned as it is (a config may hold a kind of its own)."""
    found = _BY_NAME.get(name.strip().lower())
    return found.kind.value if found is not None else name


__all__ = ["DEFAULT_SLOPE", "REPLACEMENTS", "SWAP_NAMES", "Replacement", "SwapName", "kind_of", "replacement"]
