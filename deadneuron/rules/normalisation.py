"""Built-in rule: dead channels at sites fed by conv layers with no normalisation in between.

BatchNorm re-centres every channel on each batch, so a channel whose pre-activations drift below zero is
pulled back and fires again; a plain conv stack has nothing that does this. Measured (MEASURED.md): the
bundled ARC model without BatchNorm at lr 3e-3 ends with 73-86 of 256 encoder channels dead, with
BatchNorm at 1e-3 none; a small CNN without BatchNorm at 3e-2 loses 28 of 64 ReLU channels in 50 steps,
the same net with BatchNorm none in 300. The finding names every site of the stack (the conv-fed sites
without normalisation) and the dead channels of those that fire; its fix adds BatchNorm after each conv
layer of the stack (``deadneuron patch --add-batchnorm``; for the ARC model its ``BATCH_NORM`` switch,
which covers the same four sites).

A site counts as conv-fed when its producer is a conv layer, or the ``nn.Identity`` that stands in for
BatchNorm when a config's BatchNorm switch is off. Without the model (or a state_dict) the rule cannot
tell and stays silent.
"""

from __future__ import annotations

from collections.abc import Mapping

from deadneuron.ops import AddBatchNorm
from deadneuron.report import Report, SiteHealth
from deadneuron.rules.common import pct, per_site_text, plural, samples_text
from deadneuron.rules.context import RuleContext
from deadneuron.rules.model import Evidence, Fix, Hit, Rule, Severity
from deadneuron.rules.sites import MIN_CHANNELS, MIN_FRACTION


def conv_fed_without_norm(site: SiteHealth, context: RuleContext) -> bool:
    kind = context.layers.get(site.producer) if site.producer is not None else None
    return kind == "conv" or (kind == "identity" and context.batch_norm is False)


def _dead_enough(site: SiteHealth, t: Mapping[str, float]) -> bool:
    n = len(site.dead_channels)
    return n > 0 and n >= t["min_channels"] and n / site.channels >= t["min_fraction"]


def _no_normalisation(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    """One hit for the whole stack: every conv-fed site without normalisation is named (the fix adds
    BatchNorm to the stack, as a config switch does), the dead channels are those of the firing sites."""
    stack = [s for s in report.sites.values() if conv_fed_without_norm(s, context)]
    firing = [s for s in stack if _dead_enough(s, t)]
    if not firing:
        return []
    evidence: list[Evidence] = []
    for s in firing:
        evidence.append(Evidence("dead_channels", len(s.dead_channels), t["min_channels"], ">=", s.name))
        evidence.append(Evidence("dead_fraction", len(s.dead_channels) / s.channels, t["min_fraction"], ">=", s.name))
    count, total = sum(len(s.dead_channels) for s in firing), sum(s.channels for s in firing)
    layers = list(dict.fromkeys(s.producer for s in stack if s.producer))
    values = {
        "count": count, "channels": total, "fraction": pct(count / total), "sites": plural(len(firing), "site"),
        "stack": plural(len(stack), "site"), "layers": _few(layers),
        "per_site": per_site_text({s.name: s.dead_channels for s in firing}, {s.name: s.channels for s in firing}),
        "samples": samples_text(report.meta),
        "switch": " (the config's BatchNorm switch is off)" if context.batch_norm is False else "",
    }  # fmt: skip
    return [Hit(tuple(evidence), values, tuple(s.name for s in stack), {s.name: s.dead_channels for s in firing})]


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


NO_NORMALISATION = Rule(
    id="no-normalisation",
    title="Dead channels in a conv stack without normalisation",
    severity=Severity.WARNING,
    reads=("site.dead_channels", "site.producer", "context.layers", "context.batch_norm"),
    thresholds=(MIN_CHANNELS, MIN_FRACTION),
    predicate=_no_normalisation,
    message=("{count} of {channels} channels ({fraction}) are dead at {sites} of a conv stack with no "
             "normalisation ({stack} fed directly by {layers}){switch}: {per_site}. Nothing re-centres a channel "
             "whose pre-activations drift below zero on {samples}, so it stays dead."),
    suggestion=("Add BatchNorm after each conv layer of the stack: it re-centres every channel on each batch. It "
                "is inserted as an identity (the model computes the same function until it is trained again), "
                "so retrain to see the effect."),
    fixes=lambda hit, context, t: [Fix((AddBatchNorm(tuple(hit.sites)),))],
)


__all__ = ["NO_NORMALISATION", "conv_fed_without_norm"]
