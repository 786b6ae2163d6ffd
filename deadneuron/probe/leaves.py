"""torch.nn leaves that never call an activation: the functional probe is suspended inside them.

So it is inside a parametrization (`torch.nn.utils.parametrize`: weight_norm, spectral_norm, a user's
``Symmetric`` or ``softplus`` of a weight): what runs there transforms a parameter, never an activation, so
the modules inside it are no sites, no unknown activations, and the functions they call are not measured.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from deadneuron.wrappers import user_named_modules

# torch.nn leaves that never call an activation: no functional activation can run inside them, so
# they stay off the module stack and the functional probe is suspended while they run (their hooks
# only note what they produced). Only with torch's own forward: a subclass that overrides it may
# call anything.
_QUIET = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Linear,
    nn.Bilinear,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Embedding,
    nn.Upsample,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)


def quiet_leaf(m: nn.Module) -> bool:
    return isinstance(m, ParametrizationList) or (
        isinstance(m, _QUIET)
        and not m._modules
        and getattr(type(m).forward, "__module__", "").startswith("torch.nn.modules.")
    )


def hooked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules the probe hooks, under the user's names (`user_named_modules`), less those inside a
    parametrization's `ParametrizationList` (which stays: a quiet leaf, the functional probe off inside it)."""
    inside: tuple[str, ...] = ()
    for name, m in user_named_modules(model):
        if name.startswith(inside):
            continue
        if isinstance(m, ParametrizationList):
            inside = (*inside, f"{name}.")
        yield name, m
