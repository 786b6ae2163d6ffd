"""torch.nn leaves that never call an activation: the functional probe is suspended inside them."""

from __future__ import annotations

from torch import nn

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
    return (
        isinstance(m, _QUIET)
        and not m._modules
        and getattr(type(m).forward, "__module__", "").startswith("torch.nn.modules.")
    )
