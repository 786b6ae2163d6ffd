"""Built-in rule on BatchNorm weights: channels an activation can never use, whatever the data.

A BatchNorm channel computes ``gamma * zhat + beta`` with ``zhat`` standardised. With |gamma| near 0 it
outputs the constant beta; with beta <= -k |gamma| (k = 4) it is positive only for inputs k standard
deviations above their running mean, so a ReLU after it is dead (a LeakyReLU dormant) on any data.
"""

from __future__ import annotations

from collections.abc import Mapping

from deadneuron.ops import ReinitDead, compact
from deadneuron.report import Report, SiteHealth
from deadneuron.rules.common import ids_text, is_leaky, is_relu
from deadneuron.rules.context import BatchNormScale, RuleContext
from deadneuron.rules.model import Evidence, Fix, Hit, Rule, Severity, Threshold


def _collapsed(scale: BatchNormScale, t: Mapping[str, float]) -> tuple[int, ...]:
    return tuple(c for c, g in enumerate(scale.abs_gamma) if g <= t["gamma_max"])


def _shifted(site: SiteHealth, scale: BatchNormScale, t: Mapping[str, float]) -> tuple[int, ...]:
    if not (is_relu(site) or is_leaky(site)):
        return ()  # the shift argument needs a flat region z <= 0
    return tuple(c for c, (g, b) in enumerate(zip(scale.abs_gamma, scale.beta, strict=True))
                 if g > t["gamma_max"] and b <= -t["shift_sigmas"] * g)


def _collapsed_text(site: SiteHealth, scale: BatchNormScale, ids: tuple[int, ...], t: Mapping[str, float]) -> str:
    negative = sum(1 for c in ids if scale.beta[c] <= 0)
    text = (f"|gamma| <= {compact(t['gamma_max'])} on channels {ids_text(ids)}, so it outputs the constant "
            f"beta there whatever the input")
    if is_relu(site):
        text += (f": where beta <= 0 ({negative} of {len(ids)}) the ReLU is dead whatever the data, the others "
                 "pass a constant that carries no information")
    return text


def _shifted_text(site: SiteHealth, ids: tuple[int, ...], t: Mapping[str, float]) -> str:
    effect = "dead" if is_relu(site) else "dormant"
    return (f"beta <= -{t['shift_sigmas']:g} x |gamma| on channels {ids_text(ids)}, so they turn positive only "
            f"for inputs {t['shift_sigmas']:g}+ standard deviations above their mean: {effect} whatever the data")


def _bn_collapse(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    # Only BatchNorm layers an activation consumes directly: a zero-initialised gamma before a residual
    # add (torchvision's zero_init_residual) is a deliberate choice, not a dead channel.
    hits = []
    for site in report.sites.values():
        scale = context.bn_scale_for(site)
        if scale is None:
            continue
        collapsed, shifted = _collapsed(scale, t), _shifted(site, scale, t)
        ids = tuple(sorted({*collapsed, *shifted}))
        if not ids or len(ids) < t["min_channels"]:
            continue
        evidence = [Evidence("bn_unusable_channels", len(ids), t["min_channels"], ">=", site.name)]
        parts = []
        if collapsed:
            largest = max(scale.abs_gamma[c] for c in collapsed)
            evidence.append(Evidence("bn_abs_gamma", largest, t["gamma_max"], "<=", site.name))
            parts.append(_collapsed_text(site, scale, collapsed, t))
        if shifted:
            ratio = max(scale.beta[c] / scale.abs_gamma[c] for c in shifted)
            evidence.append(Evidence("bn_beta_over_abs_gamma", ratio, -t["shift_sigmas"], "<=", site.name))
            parts.append(_shifted_text(site, shifted, t))
        dead = len(set(ids) & {*site.dead_channels, *site.dormant_channels})
        values = {
            "bn": site.producer, "site": site.name, "count": len(ids), "channels": site.channels,
            "parts": "; ".join(parts), "audit": f" The audit found {dead} of them dead or dormant." if dead else "",
        }  # fmt: skip
        hits.append(Hit(tuple(evidence), values, (site.name,), {site.name: ids}))
    return hits


BN_SCALE_COLLAPSE = Rule(
    id="bn-scale-collapse",
    title="BatchNorm channels unusable whatever the data",
    severity=Severity.WARNING,
    reads=("context.bn_scales (|gamma|, beta from the weights)", "site.producer", "site.kind"),
    thresholds=(
        Threshold("min_channels", 1, "fire at a site with at least this many such channels", integer=True, lo=1),
        Threshold("gamma_max", 0.01, "|gamma| at or below this counts as collapsed", lo=0.0),
        Threshold("shift_sigmas", 4.0, "beta <= -this x |gamma| counts as shifted out of range", lo=0.0),
    ),
    predicate=_bn_collapse,
    message="{count} of {channels} channels of BatchNorm {bn}, read by {site}, are unusable: {parts}.{audit}",
    suggestion=("Re-initialise these channels (gamma 1, beta 0, fresh incoming weights, optimizer state "
                "reset); if training uses weight decay, exclude BatchNorm parameters from it: decay pulls "
                "gamma towards 0."),
    fixes=lambda hit, context, t: [Fix((ReinitDead.of(hit.channels),))],
)
