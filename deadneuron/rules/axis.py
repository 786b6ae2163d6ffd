"""Built-in rule about the audit's own reading of the data: sites whose channel axis was guessed.

A site's channel axis is derived from the layer that produced its input and carried through the ops in
between (DESIGN section 3). Where that fails the audit guesses (dim 1 for 4-D and more, the last dim of a
3-D tensor); a wrong guess counts positions as channels, so every per-channel figure of the site (dead,
dormant, per-channel sparsity) may be wrong. This rule names those sites and how to set the axis.
"""

from __future__ import annotations

from collections.abc import Mapping

from deadneuron.report import Report, SiteHealth
from deadneuron.rules.context import RuleContext
from deadneuron.rules.model import Evidence, Hit, Rule, Severity, Threshold

GUESSED = "guessed"
_SHOWN = 4


def _reading(site: SiteHealth) -> str:
    shape = tuple(site.shape)
    return f"{site.name} (input {shape}, read on dim {site.channel_axis}: {site.channels} channels)"


def _guessed_axis(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    guessed = [s for s in report.sites.values() if s.axis_source == GUESSED]
    if len(guessed) < t["min_sites"]:
        return []
    more = len(guessed) - _SHOWN
    first = guessed[0]
    values = {
        "count": f"{len(guessed)} site{'s' if len(guessed) != 1 else ''}",
        "sites": "; ".join(_reading(s) for s in guessed[:_SHOWN]) + (f"; and {more} more" if more > 0 else ""),
        "example": f"{first.name}=AXIS",
        "example_dict": f"{{{first.name!r}: AXIS}}",
    }
    evidence = (Evidence("guessed_axis_sites", len(guessed), t["min_sites"], ">="),)
    return [Hit(evidence, values, tuple(s.name for s in guessed))]


AXIS_GUESSED = Rule(
    id="axis-guessed",
    title="Channel axis guessed",
    severity=Severity.WARNING,
    reads=("site.axis_source", "site.channel_axis", "site.shape"),
    thresholds=(Threshold("min_sites", 1, "fire at this many sites with a guessed channel axis", integer=True, lo=1),),
    predicate=_guessed_axis,
    message=("No layer with a known layout produced the input of {count}, so the channel axis was guessed: "
             "{sites}. If the guess is wrong, positions are counted as channels and every per-channel figure "
             "there (dead, dormant) is wrong."),
    suggestion=("Set the channel dim where you know it: deadneuron audit ... --channel-axis '{example}' "
                "(repeatable, globs allowed, negative dims count from the end), or "
                "deadneuron.audit(..., channel_axis={example_dict})."),
)
