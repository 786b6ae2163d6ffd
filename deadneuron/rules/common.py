"""Helpers shared by the built-in rules: activation families, grouping, wording, learning-rate fixes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from deadneuron.ops import SetHyperParameter, compact
from deadneuron.report import SiteHealth
from deadneuron.rules.context import RuleContext

# Hard zero below 0: a channel there has no gradient at all.
RELU_KINDS = frozenset({"relu", "relu6"})
# A small slope below 0: a channel there still learns, slowly.
LEAKY_KINDS = frozenset({"leaky_relu", "prelu"})


def is_relu(site: SiteHealth) -> bool:
    return site.kind in RELU_KINDS


def is_leaky(site: SiteHealth) -> bool:
    return site.kind in LEAKY_KINDS


def is_smooth(site: SiteHealth) -> bool:
    """Every other kind (GELU, SiLU, ELU, Tanh, Sigmoid, ...): flat means saturated, not zero."""
    return not is_relu(site) and not is_leaky(site)


def by_module(sites: Iterable[SiteHealth]) -> dict[str, list[SiteHealth]]:
    """Sites grouped by the activation module (or enclosing module) they run in, in forward order.

    One swap of that module changes all its sites: the seed's shared ``encoder.relu`` is four sites."""
    groups: dict[str, list[SiteHealth]] = {}
    for site in sites:
        groups.setdefault(site.module or site.name, []).append(site)
    return groups


def ids_text(ids: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def pct(x: float) -> str:
    """A share in % to one decimal; a share that is not exactly 0 or 1 never reads as 0.0% or 100.0%
    (1 dead channel of 2500 is "<0.1%", a site flat on all but 1 of 5000 elements ">99.9%")."""
    if 0 < x < 0.0005:
        return "<0.1%"
    if 0.9995 <= x < 1:
        return ">99.9%"
    return f"{100 * x:.1f}%"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def per_site_text(channels: Mapping[str, Sequence[int]], sizes: Mapping[str, int]) -> str:
    """``site 3/64 (channels 1, 5, 9); other 1/64 (channel 7)``."""
    parts = []
    for site, ids in channels.items():
        label = "channel" if len(ids) == 1 else "channels"
        parts.append(f"{site} {len(ids)}/{sizes[site]} ({label} {ids_text(ids)})")
    return "; ".join(parts)


def where_text(module: str, sites: Sequence[str]) -> str:
    if len(sites) == 1:
        return sites[0]
    return f"{len(sites)} sites of the shared module {module}"


def lr_op(context: RuleContext, scale: float) -> SetHyperParameter:
    """The exact new learning rate where the checkpoint knows the old one, else a scale of it."""
    if context.learning_rate is not None:
        return SetHyperParameter("learning_rate", value=float(f"{context.learning_rate * scale:.6g}"))
    return SetHyperParameter("learning_rate", scale=scale)


def lr_change_text(context: RuleContext, scale: float) -> str:
    if context.learning_rate is None:
        return f"learning rate x{compact(scale)}"
    lr = context.learning_rate
    return f"learning rate {compact(lr)} -> {compact(float(f'{lr * scale:.6g}'))}"


def samples_text(meta: Mapping[str, object]) -> str:
    samples = meta.get("samples")
    if isinstance(samples, str):  # the training monitor's "the training batches of steps a-b"
        return samples
    return f"{samples} samples" if isinstance(samples, int) else "the audit set"
