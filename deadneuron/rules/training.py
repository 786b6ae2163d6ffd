"""Built-in rules that read the training run: dying under the learning rate, over-training, accuracy not
above the trivial baseline, and the audit's own caveats (random inputs, untracked BatchNorm)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from deadneuron.ops import InsertDropout, SetHyperParameter, SwapActivation, compact
from deadneuron.report import UNREACHED, Report, SiteHealth
from deadneuron.rules.common import is_leaky, is_relu, lr_change_text, lr_op, pct
from deadneuron.rules.context import RuleContext
from deadneuron.rules.model import Evidence, Fix, Hit, Rule, Severity, Threshold
from deadneuron.rules.timeline import accuracy_points, dead_growth, timeline_sites

# -- dying under a high learning rate ---------------------------------------------------------------------


def _dying_ids(site: SiteHealth) -> tuple[int, ...]:
    if is_relu(site):
        return site.dead_channels
    if is_leaky(site):
        return tuple(sorted({*site.dead_channels, *site.dormant_channels}))
    return ()


def _growth_evidence(report: Report, context: RuleContext, t: Mapping[str, float]) -> tuple[Evidence, str] | None:
    sites = [s for s in timeline_sites(context.timeline) if s in report.sites]
    growth = dead_growth(context.timeline, sites)
    channels = sum(report.sites[s].channels for s in sites)
    if growth is None or not channels:
        return None
    first, last = growth
    fraction = (last - first) / channels
    if last <= first or fraction < t["min_growth"]:
        return None
    text = f"dead channels grew from {first} to {last} of {channels} over the health timeline"
    return Evidence("dead_growth_fraction", fraction, t["min_growth"], ">="), text


def _lr_dying(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    dying = {s.name: _dying_ids(s) for s in report.sites.values() if _dying_ids(s)}
    count = sum(len(ids) for ids in dying.values())
    evidence: list[Evidence] = []
    reasons: list[str] = []
    growth = _growth_evidence(report, context, t)
    if growth is not None:
        evidence.append(growth[0])
        reasons.append(growth[1])
    lr = context.learning_rate
    # A high rate alone is no evidence of dying: it must come with channels that died.
    if context.adam_family and lr is not None and lr > t["adam_lr_max"] and count >= t["min_dead_channels"]:
        evidence.append(Evidence("learning_rate", lr, t["adam_lr_max"], ">"))
        evidence.append(Evidence("dead_or_dormant_channels", count, t["min_dead_channels"], ">="))
        reasons.append(f"{count} channels are dead or dormant under {context.optimizer} at learning rate "
                       f"{compact(lr)}, above {compact(t['adam_lr_max'])}")
    if not evidence:
        return []
    relu_sites = tuple(name for name in dying if is_relu(report.sites[name]))
    values = {"reasons": "; ".join(reasons), "lr_change": lr_change_text(context, t["lr_scale"]),
              "combo": (" With dead ReLU channels, LeakyReLU together with the lower rate is the other thing to "
                        "try.") if relu_sites else ""}
    return [Hit(tuple(evidence), {**values, "relu_sites": relu_sites}, tuple(dying), dying)]


def _lr_dying_fixes(hit: Hit, context: RuleContext, t: Mapping[str, float]) -> list[Fix]:
    lower = lr_op(context, t["lr_scale"])
    fixes = [Fix((lower,))]
    if hit.values["relu_sites"]:
        swap = SwapActivation("leaky", negative_slope=0.01, sites=tuple(hit.values["relu_sites"]))
        fixes.append(Fix((swap, lower)))
    return fixes


LR_DYING = Rule(
    id="lr-dying",
    title="Channels dying under the learning rate",
    severity=Severity.WARNING,
    reads=("context.health_timeline", "context.learning_rate", "context.optimizer", "site.dead_channels"),
    thresholds=(
        Threshold("min_growth", 0.02, "net growth of dead channels over the timeline, as a fraction", lo=0.0, hi=1.0),
        Threshold("adam_lr_max", 1e-3, "an Adam learning rate above this is high", lo=0.0),
        Threshold("min_dead_channels", 1, "... when it comes with this many dead/dormant channels", integer=True, lo=1),
        Threshold("lr_scale", 0.5, "factor of the suggested learning rate", lo=0.0, hi=1.0),
    ),
    predicate=_lr_dying,
    message="Channels are dying under the learning rate: {reasons}.",
    suggestion="Halve the {lr_change}.{combo}",
    fixes=_lr_dying_fixes,
)


# -- over-training ------------------------------------------------------------------------------------


def _over_training(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    points = accuracy_points(context.history)
    if len(points) < t["min_points"]:
        return []
    best = max(points, key=lambda p: p.heldout)  # the first of equal maxima
    last = points[-1]
    drop, rise = best.heldout - last.heldout, last.train - best.train
    if drop < t["heldout_drop"] or rise < t["train_rise"]:
        return []
    evidence = (Evidence("heldout_accuracy_drop", drop, t["heldout_drop"], ">="),
                Evidence("train_accuracy_rise", rise, t["train_rise"], ">="))
    data = f" {context.data_size} training samples" if context.data_size else " its training data"
    values = {
        "best_epoch": best.epoch, "best": pct(best.heldout), "last_epoch": last.epoch, "last": pct(last.heldout),
        "train_best": pct(best.train), "train_last": pct(last.train), "data": data, "p": compact(t["dropout"]),
    }  # fmt: skip
    return [Hit(evidence, values)]


def _over_training_fixes(hit: Hit, context: RuleContext, t: Mapping[str, float]) -> list[Fix]:
    fixes = [Fix((SetHyperParameter("epochs", value=int(hit.values["best_epoch"])),))]
    if context.dropout_between_convs is not True:
        fixes.append(Fix((InsertDropout(t["dropout"]),)))
    return fixes


OVER_TRAINING = Rule(
    id="over-training",
    title="Over-training: held-out accuracy falls while training accuracy rises",
    severity=Severity.WARNING,
    reads=("context.history (train and held-out accuracy per epoch)", "context.data_size"),
    thresholds=(
        Threshold("min_points", 3, "held-out measurements needed", integer=True, lo=2),
        Threshold("heldout_drop", 0.02, "fall of held-out accuracy from its peak to the end", lo=0.0, hi=1.0),
        Threshold("train_rise", 0.01, "rise of training accuracy over the same span", lo=0.0, hi=1.0),
        Threshold("dropout", 0.1, "dropout probability of the suggested fix", lo=0.0, hi=1.0),
    ),
    predicate=_over_training,
    message=("Held-out accuracy peaked at {best} (epoch {best_epoch}) and fell to {last} by epoch {last_epoch}, "
             "while training accuracy rose from {train_best} to {train_last}: the model is memorising{data}."),
    suggestion="Stop at the peak (epoch {best_epoch}), or add dropout (p={p}) between the conv layers.",
    fixes=_over_training_fixes,
)


# -- task accuracy not above the trivial baseline ------------------------------------------------------------


def _pairs(metrics: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(metric, value, baseline) for every metric reported beside a ``baseline_<metric>``; primary first."""
    out = []
    for key, value in metrics.items():
        base = metrics.get(f"baseline_{key}")
        if not key.startswith("baseline_") and base is not None and math.isfinite(value) and math.isfinite(base):
            out.append((key, float(value), float(base)))
    return sorted(out, key=lambda p: p[0] != "valid_pixel_accuracy")


def _below_baseline(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    pairs = _pairs(report.metrics)
    if not pairs or pairs[0][1] > pairs[0][2] + t["margin"]:
        return []
    held = [(k, v, b) for k, v, b in pairs if v <= b + t["margin"]]
    evidence = tuple(Evidence(k, v, b + t["margin"], "<=") for k, v, b in held)
    key, value, base = held[0]
    others = [f"{k} {pct(v)} vs {pct(b)}" for k, v, b in held[1:]]
    values = {"metric": key, "value": pct(value), "base": pct(base),
              "others": f" (also {'; '.join(others)})" if others else ""}
    return [Hit(evidence, values)]


BELOW_BASELINE = Rule(
    id="below-baseline",
    title="Task accuracy not above the trivial baseline",
    severity=Severity.WARNING,
    reads=("report.metrics: <metric> and baseline_<metric> (valid_pixel_accuracy, exact_grid_accuracy)",),
    thresholds=(Threshold("margin", 0.0, "accuracy must beat the baseline by more than this", lo=0.0, hi=1.0),),
    predicate=_below_baseline,
    message=("{metric} is {value}, not above the trivial baseline's {base}{others}: the model does no better "
             "than the baseline (for the ARC model: painting each grid its most common colour)."),
    suggestion=("Activation fixes may not be the bottleneck: check that the model trains at all (loss falling, "
                "enough steps), and judge any fix by whether it lifts this figure above the baseline."),
)


# -- the audit's own caveats ----------------------------------------------------------------------------------

_ADVICE = (
    ("random inputs", "audit on real data (--data MODULE:FACTORY)"),
    ("never been updated", "run a few forward passes in train mode, or audit a trained checkpoint"),
    ("non-finite weights", "restore an earlier checkpoint: NaN/Inf weights make every figure meaningless"),
)


def _caveats(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    warnings = [w for w in report.warnings if UNREACHED not in w]  # what is not covered distorts nothing measured
    if report.meta.get("random_inputs") and not any("random inputs" in w for w in warnings):
        warnings.append("made on random inputs")
    if len(warnings) < t["min_warnings"]:
        return []
    advice = [a for key, a in _ADVICE if any(key in w for w in warnings)]
    values = {"warnings": "; ".join(warnings),
              "advice": ("To be sure: " + "; ".join(advice) + ".") if advice else "Read the figures with this in mind."}
    return [Hit((Evidence("report_warnings", len(warnings), t["min_warnings"], ">="),), values)]


AUDIT_CAVEATS = Rule(
    id="audit-caveats",
    title="The audit's figures may mislead",
    severity=Severity.WARNING,
    reads=("report.warnings", "report.meta.random_inputs"),
    thresholds=(Threshold("min_warnings", 1, "fire at this many report warnings", integer=True, lo=1),),
    predicate=_caveats,
    message="The audit ran under conditions that can distort its figures: {warnings}.",
    suggestion="{advice}",
)
