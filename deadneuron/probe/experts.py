"""Mixture-of-experts layers that hold their experts' weights as one stacked parameter.

Hugging Face's MoE layers (Mixtral, Qwen-MoE, DeepSeek...) keep every expert's weights in one tensor
(``gate_up_proj``: experts x 2*hidden x dim) and run all routed tokens through one activation call (or one call
per expert, in a loop over the experts a batch hits): a channel of that site is the same neuron index in every
expert, so its figures pool the experts' neurons, and a channel reads dead only where it is dead in every expert.
Which expert computed which row is known only inside the layer's own code, so such a site is named in the
warnings, as a vmapped ensemble is. Found by shape, once per site: the module running the activation, or the
nearest module above it holding parameters of its own, holds a parameter of three or more dims (not a
convolution's kernel) whose expert dim is more than one and whose other dims hold the site's channel count (or
twice it: a gate and an up projection in one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from deadneuron.probe.site import Site


def stacked_experts(owner: str, modules: Mapping[str, nn.Module], channels: int) -> str | None:
    """The stacked expert weights that the module ``owner`` (a name of ``modules``) or the nearest module above it
    holding parameters computes with, described for the warning (``'experts' (MixtralExperts): gate_up_proj
    8 x 28672 x 4096``), or None."""
    name: str | None = owner
    while name is not None:
        m = modules.get(name)
        params = list(m.named_parameters(recurse=False)) if m is not None else []
        if params:
            if isinstance(m, nn.modules.conv._ConvNd):
                return None
            for pname, p in params:
                if p.dim() >= 3 and p.shape[0] > 1 and any(channels in (d, d // 2) for d in p.shape[1:]):
                    return f"{name!r} ({type(m).__name__}): {pname} {' x '.join(map(str, p.shape))}"
            return None
        name = None if name == "" else name.rsplit(".", 1)[0] if "." in name else ""
    return None


def experts_warnings(named: Iterable[tuple[str, Site]]) -> list[str]:
    """A warning per site (``named``: each site's name and running state) computed with stacked expert weights."""
    return [f"site {name!r} runs in {site.experts}, a stack of per-expert weights: its channels are the same "
            "neuron index of every expert (the layer routes rows to experts in its own code), so each channel's "
            "figures pool the experts' neurons and a channel counts as dead only where it is dead in every expert"
            for name, site in named if site.experts]  # fmt: skip
