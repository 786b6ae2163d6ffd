"""Built-in rules about activation sites: dead, dormant, saturated and non-finite channels, and the
sparse-but-healthy verdict that keeps BatchNorm+ReLU's 50% zeros from being "fixed".

A rule fires per site and groups the firing sites by their activation module, since one swap of that
module changes all of them (the seed's shared ``encoder.relu`` is four sites).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from deadneuron.ops import ReinitDead, SwapActivation, compact
from deadneuron.report import DORMANT_FRACTION, Report, SiteHealth
from deadneuron.rules.common import (
    by_module,
    ids_text,
    is_leaky,
    is_relu,
    is_smooth,
    lr_change_text,
    lr_op,
    pct,
    per_site_text,
    plural,
    samples_text,
    where_text,
)
from deadneuron.rules.context import RuleContext
from deadneuron.rules.model import Evidence, Fix, Hit, Rule, Severity, Threshold
from deadneuron.rules.timeline import at_steps, dead_from_start_text, dead_history

MIN_CHANNELS = Threshold("min_channels", 1, "fire at a site with at least this many such channels", integer=True, lo=1)
# Below 5% of a site, dead channels stay in the table but get no advice: a few are common in trained ReLU
# networks (the bundled ARC model's decoder has 5-15 of 64 even in its healthy BatchNorm configuration).
MIN_FRACTION = Threshold("min_fraction", 0.05, "and at least this fraction of the site's channels", lo=0.0, hi=1.0)
ChannelPick = Callable[[SiteHealth], tuple[int, ...]]


def _channel_hits(report: Report, t: Mapping[str, float], *, family: Callable[[SiteHealth], bool],
                  pick: ChannelPick, metric: str) -> list[Hit]:
    """One hit per activation module whose sites have >= min_channels picked channels (and the fraction)."""
    firing = []
    for site in report.sites.values():
        ids = pick(site) if family(site) else ()
        if ids and len(ids) >= t["min_channels"] and len(ids) / site.channels >= t["min_fraction"]:
            firing.append((site, ids))
    hits = []
    for module, sites in by_module(s for s, _ in firing).items():
        names = {s.name for s in sites}
        channels = {s.name: ids for s, ids in firing if s.name in names}
        evidence = []
        for s in sites:
            n = len(channels[s.name])
            evidence.append(Evidence(metric, n, t["min_channels"], ">=", s.name))
            evidence.append(Evidence(f"{metric.removesuffix('_channels')}_fraction", n / s.channels, t["min_fraction"], ">=", s.name))
        count, total = sum(len(v) for v in channels.values()), sum(s.channels for s in sites)
        values = {
            "count": count, "channels": total, "fraction": pct(count / total), "module": module,
            "where": where_text(module, [s.name for s in sites]), "label": sites[0].label,
            "flat_region": sites[0].flat_region, "samples": samples_text(report.meta),
            "per_site": (f"channels {ids_text(channels[sites[0].name])}" if len(sites) == 1
                         else per_site_text(channels, {s.name: s.channels for s in sites})),
        }  # fmt: skip
        hits.append(Hit(tuple(evidence), values, tuple(s.name for s in sites), channels))
    return hits


def _history_note(context: RuleContext, channels: Mapping[str, Sequence[int]]) -> str:
    """' Over the health timeline ...: 14 dead at init, 72 died in training (...), 30 revived.' ("dead since
    the first window measured (step N)" for a timeline that starts at step N > 0: a resumed run)."""
    histories = [h for h in (dead_history(context.timeline, s) for s in channels) if h is not None]
    if not histories:
        return ""
    at_init = sum(len(h.at_init) for h in histories)
    died = sum(len(h.died) for h in histories)
    revived = sum(len(h.revived) for h in histories)
    windows = sorted({w for h in histories for w in h.died_windows})
    when = ""
    if windows:
        when = f" (first seen dead {at_steps(windows[0])})" if len(windows) == 1 else \
            f" (first seen dead between steps {windows[0][0]} and {windows[-1][1]})"
    span = f"steps {histories[0].first_step}-{histories[0].last_step}"
    measured = context.timeline[0].get("measured_on")
    span += f", on the {measured}" if isinstance(measured, str) else ", on its own probe set"
    start = dead_from_start_text(histories[0].first_window)
    return (f" Over the health timeline ({span}): {at_init} {start}, "
            f"{died} died in training{when}, {revived} revived.")


# -- dead channels at ReLU sites ------------------------------------------------------------------------


def _dead_relu(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    hits = _channel_hits(report, t, family=is_relu, pick=lambda s: s.dead_channels, metric="dead_channels")
    out = []
    for hit in hits:
        dormant = sum(len(report.sites[s].dormant_channels) for s in hit.sites)
        extra = {
            "dormant": (f" {plural(dormant, 'more channel')} {'is' if dormant == 1 else 'are'} dormant (flat on "
                        f"at least {100 * DORMANT_FRACTION:g}% of elements).") if dormant else "",
            "history": _history_note(context, hit.channels),
            "slope": compact(t["negative_slope"]),
        }
        out.append(Hit(hit.evidence, {**hit.values, **extra}, hit.sites, hit.channels))
    return out


def _dead_relu_fixes(hit: Hit, context: RuleContext, t: Mapping[str, float]) -> list[Fix]:
    swap = SwapActivation("leaky", negative_slope=t["negative_slope"], sites=tuple(hit.sites))
    return [Fix((swap,)), Fix((ReinitDead.of(hit.channels),))]


DEAD_RELU = Rule(
    id="dead-relu",
    title="Dead channels at a ReLU site",
    severity=Severity.WARNING,
    reads=("site.kind", "site.dead_channels", "site.dormant_channels", "context.health_timeline"),
    thresholds=(MIN_CHANNELS, MIN_FRACTION,
                Threshold("negative_slope", 0.01, "slope of the suggested LeakyReLU", lo=0.0, hi=1.0)),
    predicate=_dead_relu,
    message=("{count} of {channels} channels ({fraction}) are dead at {where} ({label}): {per_site}. Their "
             "pre-activation stayed in the flat region ({flat_region}) on every element of {samples}, so they "
             "output 0, pass no gradient and cannot recover on their own.{dormant}{history}"),
    suggestion=("Try LeakyReLU({slope}), whose leak keeps a gradient flowing through them, or re-initialise "
                "the dead channels (ReDo: fresh incoming weights, zero outgoing weights, optimizer state reset)."),
    fixes=_dead_relu_fixes,
)


# -- dormant channels at LeakyReLU / PReLU sites ---------------------------------------------------------


def _dormant_ids(site: SiteHealth) -> tuple[int, ...]:
    # A leaky channel negative everywhere is in dead_channels but still learns through the leak.
    return tuple(sorted({*site.dead_channels, *site.dormant_channels}))


def _dormant_leaky(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    hits = _channel_hits(report, t, family=is_leaky, pick=_dormant_ids, metric="dead_or_dormant_channels")
    out = []
    for hit in hits:
        always = sum(len(report.sites[s].dead_channels) for s in hit.sites)
        extra = {
            "always": (f" {always} of them {'is' if always == 1 else 'are'} negative on every element."
                       if always else ""),
            "percent": f"{100 * DORMANT_FRACTION:g}%",
            "lr_change": lr_change_text(context, t["lr_scale"]),
        }
        out.append(Hit(hit.evidence, {**hit.values, **extra}, hit.sites, hit.channels))
    return out


def _dormant_leaky_fixes(hit: Hit, context: RuleContext, t: Mapping[str, float]) -> list[Fix]:
    return [
        Fix((SwapActivation("gelu", sites=tuple(hit.sites)),)),
        Fix((ReinitDead.of(hit.channels),)),
        Fix((lr_op(context, t["lr_scale"]),)),
    ]


DORMANT_LEAKY = Rule(
    id="dormant-leaky",
    title="Dormant channels at a LeakyReLU site",
    severity=Severity.WARNING,
    reads=("site.kind", "site.dead_channels", "site.dormant_channels", "context.learning_rate"),
    thresholds=(MIN_CHANNELS, MIN_FRACTION,
                Threshold("lr_scale", 0.5, "factor of the suggested lower learning rate", lo=0.0, hi=1.0)),
    predicate=_dormant_leaky,
    message=("{count} of {channels} channels ({fraction}) at {where} ({label}) are negative on at least "
             "{percent} of the elements of {samples}: {per_site}.{always} They are dormant, not dead: only the "
             "leak carries their gradient, so they learn far more slowly than a channel that fires."),
    suggestion=("Try GELU (a gradient almost everywhere; the memo's fallback), re-initialise these channels "
                "with their optimizer state reset, or lower the {lr_change}."),
    fixes=_dormant_leaky_fixes,
)


# -- saturated channels at smooth / saturating sites ------------------------------------------------------


def _stuck(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    hits = _channel_hits(report, t, family=is_smooth, pick=lambda s: s.dead_channels, metric="dead_channels")
    delta = report.meta.get("delta", 0.05)
    extra = {"delta": pct(float(delta)) if isinstance(delta, (int, float)) else "5%",
             "lr_change": lr_change_text(context, t["lr_scale"])}
    return [Hit(h.evidence, {**h.values, **extra}, h.sites, h.channels) for h in hits]


STUCK_SMOOTH = Rule(
    id="stuck-smooth",
    title="Channels stuck in a saturated activation",
    severity=Severity.WARNING,
    reads=("site.kind", "site.dead_channels", "site.flat_region"),
    thresholds=(MIN_CHANNELS, MIN_FRACTION,
                Threshold("lr_scale", 0.5, "factor of the suggested lower learning rate", lo=0.0, hi=1.0)),
    predicate=_stuck,
    message=("{count} of {channels} channels ({fraction}) at {where} ({label}) stayed in the flat region "
             "({flat_region}) on every element of {samples}: {per_site}. There the slope is at most {delta} "
             "of its maximum: they pass a near-constant and barely learn."),
    suggestion="Re-initialise them with their optimizer state reset, or lower the {lr_change}.",
    fixes=lambda hit, context, t: [Fix((ReinitDead.of(hit.channels),)), Fix((lr_op(context, t["lr_scale"]),))],
)


# -- non-finite activations ------------------------------------------------------------------------------


def _nonfinite(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    bad = [s for s in report.sites.values() if s.nonfinite and s.nonfinite >= t["min_elements"]]
    if not bad:
        return []
    evidence = tuple(Evidence("nonfinite", s.nonfinite, t["min_elements"], ">=", s.name) for s in bad)
    values = {
        "total": sum(s.nonfinite for s in bad), "sites": plural(len(bad), "site"), "first": bad[0].name,
        "names": ", ".join(s.name for s in bad[:6]) + (" ..." if len(bad) > 6 else ""),
        "lr_change": lr_change_text(context, t["lr_scale"]),
    }  # fmt: skip
    return [Hit(evidence, values, tuple(s.name for s in bad))]


NONFINITE = Rule(
    id="nonfinite",
    title="Non-finite activations (NaN/Inf)",
    severity=Severity.ERROR,
    reads=("site.nonfinite", "context.learning_rate"),
    thresholds=(Threshold("min_elements", 1, "fire at this many NaN/Inf elements at a site", integer=True, lo=1),
                Threshold("lr_scale", 0.1, "factor of the suggested lower learning rate", lo=0.0, hi=1.0)),
    predicate=_nonfinite,
    message=("{total} activation elements are NaN or Inf at {sites} ({names}), first at {first}: every "
             "figure downstream of {first} is unreliable."),
    suggestion=("Lower the {lr_change} and clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), "
                "1.0)); check the inputs and the weights for NaN."),
    fixes=lambda hit, context, t: [Fix((lr_op(context, t["lr_scale"]),))],
)


# -- sparse but healthy ------------------------------------------------------------------------------------


def _sparse_healthy(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    healthy = [s for s in report.sites.values()
               if is_relu(s) and s.sparsity >= t["min_sparsity"] and not s.dead_channels and not s.dormant_channels]
    if not healthy:
        return []
    evidence = []
    for s in healthy:
        evidence.append(Evidence("sparsity", s.sparsity, t["min_sparsity"], ">=", s.name))
        evidence.append(Evidence("dead_or_dormant_channels", 0, 0, "<=", s.name))
    fed_by_bn = any(context.bn_scale_for(s) is not None for s in healthy)
    lo, hi = min(s.sparsity for s in healthy), max(s.sparsity for s in healthy)
    values = {
        "sites": plural(len(healthy), "site"), "names": ", ".join(s.name for s in healthy),
        "are": "is" if len(healthy) == 1 else "are",
        "range": pct(lo) if lo == hi else f"{pct(lo)}-{pct(hi)}",
        "why": (" After BatchNorm about half of the pre-activations are negative by construction." if fed_by_bn
                else " A centred pre-activation (after BatchNorm, for one) is negative about half the time."),
    }  # fmt: skip
    return [Hit(tuple(evidence), values, tuple(s.name for s in healthy))]


SPARSE_HEALTHY = Rule(
    id="sparse-healthy",
    title="Sparse but healthy",
    severity=Severity.INFO,
    reads=("site.kind", "site.sparsity", "site.dead_channels", "site.dormant_channels"),
    thresholds=(Threshold("min_sparsity", 0.5, "report sites at least this sparse", lo=0.0, hi=1.0),),
    predicate=_sparse_healthy,
    message=("{sites} ({names}) {are} {range} zeros, yet no channel is dead or dormant: every channel fires on "
             "part of the data. A ReLU outputs 0 for every negative pre-activation.{why} This sparsity is how "
             "a healthy ReLU layer looks, not a sign of dying."),
    suggestion="Nothing to fix: swapping the activation to lower this figure would not make the layer healthier.",
)
