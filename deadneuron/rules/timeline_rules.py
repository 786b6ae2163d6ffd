"""Rules over a health timeline, for any model (DESIGN section 9): channels dying since a step, revived,
dead from the start, not learning (exactly zero gradient), activations blowing up.

They read ``context.timeline``: the entries of `deadneuron.Monitor` (``Snapshot.to_dict``, measured on
the training batches) or of a checkpoint's health timeline (the ARC trainer's, on its probe set). A key
an entry lacks keeps the rule that needs it silent. `monitor_context` builds the context of a monitored
run (learning rate and optimizer read from the optimizer the user passed); `monitor_rules` is every
installed rule plus these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deadneuron.ops import compact
from deadneuron.report import Report
from deadneuron.rules.common import ids_text, lr_change_text, plural
from deadneuron.rules.context import RuleContext, bn_scales
from deadneuron.rules.model import Evidence, Hit, Rule, RuleSet, Severity, Threshold
from deadneuron.rules.timeline import DeadHistory, at_steps, dead_history, timeline_sites, window_of

if TYPE_CHECKING:
    from torch import nn

MIN_CHANNELS = Threshold("min_channels", 1, "fire at a site with at least this many such channels", integer=True, lo=1)
MIN_FRACTION = Threshold("min_fraction", 0.02, "and at least this fraction of the site's channels", lo=0.0, hi=1.0)


def monitor_context(entries: Sequence[Mapping[str, Any]], *, learning_rate: float | None, optimizer: str | None,
                    steps: int, model: nn.Module | None = None) -> RuleContext:  # fmt: skip
    """The rules' context for a monitored training run."""
    from torch import nn

    has_bn = model is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return RuleContext(learning_rate=learning_rate, optimizer=optimizer, steps=steps, timeline=tuple(entries),
                       batch_norm=has_bn if model is not None else None,
                       bn_scales=bn_scales(model) if model is not None else {})  # fmt: skip


def _site(entry: Mapping[str, Any], site: str) -> Mapping[str, Any]:
    sites = entry.get("sites")
    value = sites.get(site) if isinstance(sites, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _number(entry: Mapping[str, Any], site: str, key: str) -> float | None:
    value = _site(entry, site).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _channels(report: Report, context: RuleContext, site: str) -> int | None:
    count = _number(context.timeline[-1], site, "channels") if context.timeline else None
    if count is not None:
        return int(count)
    return report.sites[site].channels if site in report.sites else None


def _per_site(picked: Mapping[str, Sequence[int]], sizes: Mapping[str, int], steps: Mapping[str, str]) -> str:
    parts = []
    for site, ids in picked.items():
        label = "channel" if len(ids) == 1 else "channels"
        parts.append(f"{site} {len(ids)}/{sizes[site]} ({label} {ids_text(ids, 8)}{steps.get(site, '')})")
    return "; ".join(parts)


def _history_hits(report: Report, context: RuleContext, t: Mapping[str, float],
                  pick: str) -> tuple[dict[str, tuple[int, ...]], dict[str, int], dict[str, DeadHistory]]:  # fmt: skip
    """Sites whose ``pick`` channels (a DeadHistory field) pass the thresholds."""
    picked: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    histories: dict[str, DeadHistory] = {}
    for site in timeline_sites(context.timeline):
        history = dead_history(context.timeline, site)
        channels = _channels(report, context, site)
        ids = getattr(history, pick) if history is not None else ()
        if not ids or not channels or len(ids) < t["min_channels"] or len(ids) / channels < t["min_fraction"]:
            continue
        picked[site], sizes[site] = ids, channels
        assert history is not None
        histories[site] = history
    return picked, sizes, histories


def _evidence(picked: Mapping[str, Sequence[int]], sizes: Mapping[str, int], t: Mapping[str, float],
              metric: str) -> tuple[Evidence, ...]:  # fmt: skip
    out = []
    for site, ids in picked.items():
        out.append(Evidence(metric, len(ids), t["min_channels"], ">=", site))
        out.append(Evidence(f"{metric}_fraction", len(ids) / sizes[site], t["min_fraction"], ">=", site))
    return tuple(out)


# -- channels dying since a step -----------------------------------------------------------------------


def _dying(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    picked, sizes, histories = _history_hits(report, context, t, "died")
    if not picked:
        return []
    since = min(min(h.died_steps) for h in histories.values())
    first_seen = {site: f", first seen dead {at_steps(min(h.died_windows))}" for site, h in histories.items()}
    first = next(iter(histories.values()))
    values = {
        "count": sum(len(v) for v in picked.values()), "since": since, "first": at_steps(first.first_window),
        "last": at_steps(first.last_window), "per_site": _per_site(picked, sizes, first_seen),
        "lr_change": lr_change_text(context, 0.5),
    }  # fmt: skip
    return [Hit(_evidence(picked, sizes, t, "died_channels"), values, tuple(picked), picked)]


CHANNELS_DYING = Rule(
    id="channels-dying",
    title="Channels dying during training",
    severity=Severity.WARNING,
    reads=("context.health_timeline: dead_channels per site and step",),
    thresholds=(MIN_CHANNELS, MIN_FRACTION),
    predicate=_dying,
    message=("{count} channels have been dying since step {since}: alive {first}, dead {last} "
             "(their pre-activation in the flat region on every element): {per_site}."),
    suggestion=("Lower the {lr_change}; where the activation is a ReLU, LeakyReLU(0.01) keeps a gradient "
                "flowing through channels that go negative; or re-initialise them (ReDo)."),
)


# -- revived, and dead from the start (information) ------------------------------------------------------


def _revived(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    picked, sizes, histories = _history_hits(report, context, t, "revived")
    if not picked:
        return []
    last = at_steps(next(iter(histories.values())).last_window)
    values = {"count": sum(len(v) for v in picked.values()), "last": last, "per_site": _per_site(picked, sizes, {})}
    return [Hit(_evidence(picked, sizes, t, "revived_channels"), values, tuple(picked), picked)]


CHANNELS_REVIVED = Rule(
    id="channels-revived",
    title="Channels dead for a while that fire again",
    severity=Severity.INFO,
    reads=("context.health_timeline: dead_channels per site and step",),
    thresholds=(MIN_CHANNELS, MIN_FRACTION),
    predicate=_revived,
    message="{count} channels were dead at some timeline point and fire again {last}: {per_site}.",
    suggestion=("A dead window is not always death: what feeds them changed. Judge a channel by the last "
                "points of the timeline."),
)


def _dead_from_start(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    picked, sizes, histories = _history_hits(report, context, t, "at_init")
    if not picked:
        return []
    first = next(iter(histories.values()))
    values = {"count": sum(len(v) for v in picked.values()), "first": at_steps(first.first_window),
              "last": at_steps(first.last_window), "per_site": _per_site(picked, sizes, {}),
              "cause": _start_cause(first.first_step)}  # fmt: skip
    return [Hit(_evidence(picked, sizes, t, "dead_from_start_channels"), values, tuple(picked), picked)]


def _start_cause(step: int) -> str:
    """Why channels dead at the first entry are dead: at step 0 training had not begun; a timeline that
    starts later (a resumed run, a monitor's ``start_step``) did not see the steps before it."""
    if step == 0:
        return "Training did not kill them; initialisation or the data left them dead."
    return (f"The timeline starts at step {step}, not at initialisation (a resumed run): they may have died in "
            "the steps before it, or initialisation or the data left them dead.")


DEAD_FROM_START = Rule(
    id="dead-from-start",
    title="Channels dead from the first timeline point on",
    severity=Severity.INFO,
    reads=("context.health_timeline: dead_channels at the first and last step",),
    thresholds=(MIN_CHANNELS, MIN_FRACTION),
    predicate=_dead_from_start,
    message="{count} channels were dead at the first timeline point ({first}) and still are {last}: {per_site}. {cause}",
    suggestion="Re-initialise them (ReDo), or check the initialisation and the scale of the layer's input.",
)


# -- not learning: exactly zero gradient ------------------------------------------------------------------


def _not_learning(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    if not context.timeline:
        return []
    entry = context.timeline[-1]
    picked: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    sites = entry.get("sites")
    for site in sites if isinstance(sites, Mapping) else ():
        value = _site(entry, site)
        channels = _channels(report, context, site)
        if not value.get("grad_elements") or not channels:
            continue
        dead = set(value.get("dead_channels") or ())
        ids = tuple(int(c) for c in value.get("not_learning_channels") or () if int(c) not in dead)
        if ids and len(ids) >= t["min_channels"] and len(ids) / channels >= t["min_fraction"]:
            picked[site], sizes[site] = ids, channels
    if not picked:
        return []
    span = f"steps {entry.get('first_step', '?')}-{int(entry.get('step', 0)) - 1}"
    values = {"count": sum(len(v) for v in picked.values()), "span": span, "per_site": _per_site(picked, sizes, {})}
    return [Hit(_evidence(picked, sizes, t, "not_learning_channels"), values, tuple(picked), picked)]


NOT_LEARNING = Rule(
    id="not-learning",
    title="Channels that get no gradient",
    severity=Severity.WARNING,
    reads=("context.health_timeline: not_learning_channels and dead_channels of the last entry",),
    thresholds=(MIN_CHANNELS, Threshold("min_fraction", 0.05, "and at least this fraction of the site's "
                                        "channels", lo=0.0, hi=1.0)),  # fmt: skip
    predicate=_not_learning,
    message=("{count} channels got exactly zero gradient dL/dz on every element over {span} although they are "
             "not dead: {per_site}. Nothing downstream uses them, so they do not learn."),
    suggestion=("Look downstream of those channels: zero outgoing weights, a detached or masked path, or an "
                "output the loss ignores."),
)


# -- activations blowing up --------------------------------------------------------------------------------


def _growth(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    if len(context.timeline) < 2:
        return []
    first, last = context.timeline[0], context.timeline[-1]
    grown: dict[str, tuple[float, float, float]] = {}
    for site in timeline_sites(context.timeline):
        a0, a1 = _number(first, site, "abs_mean"), _number(last, site, "abs_mean")
        if a0 is None or a1 is None or a0 <= 0 or a1 < t["min_abs_mean"] or a1 / a0 < t["factor"]:
            continue
        grown[site] = (a0, a1, _number(last, site, "abs_max") or math.nan)
    if not grown:
        return []
    evidence = tuple(Evidence("abs_mean_growth", a1 / a0, t["factor"], ">=", site) for site, (a0, a1, _) in grown.items())
    per_site = "; ".join(f"{site} {compact(a0)} -> {compact(a1)} ({a1 / a0:.0f}x, largest |a| {compact(m)})"
                         for site, (a0, a1, m) in grown.items())  # fmt: skip
    values = {"where": plural(len(grown), "site"), "first": at_steps(window_of(first, 0)),
              "last": at_steps(window_of(last, len(context.timeline) - 1)),
              "per_site": per_site, "lr_change": lr_change_text(context, 0.5)}  # fmt: skip
    return [Hit(evidence, values, tuple(grown))]


ACTIVATION_GROWTH = Rule(
    id="activation-growth",
    title="Activations blowing up",
    severity=Severity.WARNING,
    reads=("context.health_timeline: abs_mean and abs_max per site",),
    thresholds=(Threshold("factor", 10.0, "growth of mean |a| from the first to the last entry", lo=1.0),
                Threshold("min_abs_mean", 1.0, "and mean |a| at the last entry at least", lo=0.0)),  # fmt: skip
    predicate=_growth,
    message="Mean |activation| grew at {where} from the first timeline point ({first}) to the last ({last}): {per_site}.",
    suggestion=("Activations that keep growing end in Inf/NaN: lower the {lr_change}, clip gradients "
                "(torch.nn.utils.clip_grad_norm_), or normalise before the activation."),
)

TIMELINE_RULES: tuple[Rule, ...] = (CHANNELS_DYING, NOT_LEARNING, ACTIVATION_GROWTH, CHANNELS_REVIVED, DEAD_FROM_START)


def monitor_rules() -> RuleSet:
    """Every installed rule (built-in and third-party), then the timeline rules."""
    from deadneuron.rules.plugins import load_rules

    return load_rules().plus(TIMELINE_RULES)
