"""Built-in rule about the audit's own reading of the data: sites whose channel axis was guessed.

A site's channel axis is derived from the layer that produced its input and carried through the ops in
between (DESIGN section 3). Where that fails the audit guesses (dim 1 for 4-D and more, the last dim of a
3-D tensor); a wrong guess counts positions as channels, so every per-channel figure of the site (dead,
dormant, per-channel sparsity) may be wrong. This rule names those sites and how to set the axis: the
audit's own command line (``report.meta["audit_args"]``, which ``deadneuron audit`` records) with
``--channel-axis 'SITE=AXIS'`` added, or, for an audit from Python, the ``channel_axis`` keyword. AXIS is
the one word left to fill in; the text lists the dims of the site's input to choose from.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

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
        "dims": _dims(first),
        **_how(first.name, report.meta.get("audit_args")),
    }
    evidence = (Evidence("guessed_axis_sites", len(guessed), t["min_sites"], ">="),)
    return [Hit(evidence, values, tuple(s.name for s in guessed))]


def _dims(site: SiteHealth) -> str:
    """The dims AXIS can name, from the shape of the site's input."""
    n = max(len(site.shape), 1)
    return (f"AXIS: one of 0..{n - 1} for input {tuple(site.shape)}, or -{n}..-1 counting from the end, or none "
            "(None from Python) where the input has no channel dim (every element one channel's)")


def _how(site: str, audit_args: Any) -> dict[str, str]:
    """How to set the axis of ``site``: the audit's command line again with ``--channel-axis`` added (every
    word quoted where a shell needs it), or the ``channel_axis`` keyword where the audit ran from Python."""
    if _words(audit_args):
        setting = shlex.quote(f"{site}=AXIS")
        setting = setting if setting.startswith("'") else f"'{setting}'"  # quoted alike for every site name
        command = " ".join(["deadneuron", "audit", *(shlex.quote(w) for w in audit_args), "--channel-axis", setting])
        return {"again": " and audit again", "set_axis": command, "more": "one --channel-axis per site, globs allowed"}
    return {"again": "", "set_axis": f"deadneuron.audit(..., channel_axis={{{site!r}: AXIS}})",
            "more": "one entry per site, globs allowed"}  # fmt: skip


def _words(value: Any) -> bool:
    """``value`` is a non-empty list of words (a report read back from JSON may hold anything)."""
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(w, str) for w in value))  # fmt: skip


AXIS_GUESSED = Rule(
    id="axis-guessed",
    title="Channel axis guessed",
    severity=Severity.WARNING,
    reads=("site.axis_source", "site.channel_axis", "site.shape", "report.meta.audit_args"),
    thresholds=(Threshold("min_sites", 1, "fire at this many sites with a guessed channel axis", integer=True, lo=1),),
    predicate=_guessed_axis,
    message=("No layer with a known layout produced the input of {count}, so the channel axis was guessed: "
             "{sites}. If the guess is wrong, positions are counted as channels and every per-channel figure "
             "there (dead, dormant) is wrong."),
    suggestion="Set the channel dim where you know it{again}: {set_axis} ({dims}; {more}).",
)
