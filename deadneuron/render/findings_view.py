"""What a report's findings say at a glance: a one-line verdict, and one group per rule.

The rule engine gives one finding per site (or per module shared by several sites), each with a long
message, its evidence and the commands that try the fix. A reader wants the answer first: this module
groups the findings of one rule into a :class:`FindingGroup` (one line per site, the evidence in numbers,
each distinct command once), ranks the groups so that task-level findings (below the trivial baseline,
collapsed slots, NaN/Inf) come before per-site channel warnings of the same severity, and words the
verdict. Pure: values in, values out; the renderers decide how the lines look.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deadneuron.report import Report
from deadneuron.rules.common import pct
from deadneuron.rules.finding import Finding
from deadneuron.rules.model import Severity

# Findings about the task or the whole model: ranked above per-site findings of the same severity.
LEAD_RULES = ("nonfinite", "below-baseline", "slot-collapse")
_SHARE_WORDS = ("fraction", "share", "accuracy", "sparsity")


@dataclass(frozen=True)
class SiteLine:
    """One line of a group: a site (empty for model-wide evidence) and what was measured there."""

    site: str
    text: str


@dataclass(frozen=True)
class FindingGroup:
    """Every finding of one rule: one line per site, each distinct command once, the full messages."""

    rule: str
    severity: Severity
    title: str
    lines: tuple[SiteLine, ...]
    commands: tuple[str, ...]
    messages: tuple[str, ...]
    sites: tuple[str, ...]

    @property
    def headline(self) -> str:
        """The title, with the number of sites when the rule fired at more than one."""
        return self.title + (f" ({len(self.sites)} sites)" if len(self.sites) > 1 else "")


def _is_share(metric: str) -> bool:
    return any(word in metric for word in _SHARE_WORDS) or metric.startswith("images_")


def number_text(metric: str, value: float) -> str:
    """A measured value as the reader expects it: shares in %, counts whole, the rest 3 significant digits."""
    if not math.isfinite(value):
        return str(value)
    if _is_share(metric):
        return pct(value)
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.2f}" if 0.01 <= abs(value) < 100 else f"{value:.3g}"


_COUNT_SUFFIXES = ("_channels", "_sites", "_warnings")  # evidence metrics that count things
_COUNT_WORDS = {"nonfinite": "non-finite activations"}


def _count_words(metric: str) -> str | None:
    """``"dead channels"`` for a metric that counts things, None for any other measurement."""
    if metric in _COUNT_WORDS:
        return _COUNT_WORDS[metric]
    return metric.replace("_", " ") if metric.endswith(_COUNT_SUFFIXES) else None


def _count_text(metric: str, value: float) -> str:
    """``"2 dead channels"``, ``"1 dead channel"``: the count first, so that it never reads as an id."""
    words = _count_words(metric) or metric.replace("_", " ")
    text = number_text(metric, value)
    return f"{text} {words.removesuffix('s') if text == '1' else words}"


def _share_of(metric: str, measured: Mapping[str, float]) -> str | None:
    """The metric giving the share of the site's channels beside the channel count ``metric``
    (``dead_fraction`` beside ``dead_channels``, ``died_channels_fraction`` beside ``died_channels``)."""
    if not metric.endswith("_channels") or not float(measured[metric]).is_integer():
        return None
    for name in (f"{metric}_fraction", f"{metric.removesuffix('_channels')}_fraction"):
        share = measured.get(name)
        if share is not None and math.isfinite(share) and share > 0:
            return name
    return None


def _site_text(measured: Mapping[str, float]) -> str:
    """A site's evidence: ``"14 of 64 channels dead (21.9%)"`` for a channel count with its share (the
    site's channel count is count / share), ``"0 dead or dormant channels"`` for a bare count, ``"sparsity
    55.2%"`` for any other measurement."""
    shares = {metric: _share_of(metric, measured) for metric in measured}
    said = {name for name in shares.values() if name is not None}
    texts = []
    for metric, value in measured.items():
        share = shares[metric]
        if share is not None:
            adjective = metric.removesuffix("_channels").replace("_", " ")
            texts.append(f"{int(value)} of {round(value / measured[share])} channels {adjective} ({pct(measured[share])})")
        elif metric in said:
            continue  # said with its count
        elif _count_words(metric) is not None:
            texts.append(_count_text(metric, value))
        else:
            texts.append(f"{metric.replace('_', ' ')} {number_text(metric, value)}")
    return ", ".join(texts)


_SAID_IN_FULL = {
    "report_warnings": lambda n: f"{_count(n, 'warning')} about how the audit ran: see the warning lines",
    "guessed_axis_sites": lambda n: f"{_count(n, 'site')} whose channel axis was guessed: marked ? in the site table",
}


def evidence_lines(findings: Sequence[Finding]) -> list[SiteLine]:
    """One line per site (its observed values) and one line for the model-wide evidence (with the limits
    that made the rule fire: ``observed <comparison> threshold``). Counts come before their words (``"2 dead
    channels"``, never ``"dead channels 2"``, which reads as channel 2)."""
    per_site: dict[str, dict[str, float]] = {}
    overall: list[str] = []
    for e in (e for f in findings for e in f.evidence):
        if e.site is not None:
            per_site.setdefault(e.site, {})[e.metric] = e.observed
        elif e.metric in _SAID_IN_FULL:  # a limit of 1 says nothing: what they are is printed with the report
            overall.append(_SAID_IN_FULL[e.metric](int(e.observed)))
        elif _count_words(e.metric) is not None:
            overall.append(f"{_count_text(e.metric, e.observed)} {e.comparison} {number_text(e.metric, e.threshold)}")
        else:
            name = e.metric.replace("_", " ")
            overall.append(f"{name} {number_text(e.metric, e.observed)} {e.comparison} {number_text(e.metric, e.threshold)}")
    lines = [SiteLine(site, _site_text(measured)) for site, measured in per_site.items()]
    return ([SiteLine("", "; ".join(overall))] if overall else []) + lines


def _sites(findings: Sequence[Finding]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for f in findings for s in f.sites))


def group_findings(findings: Sequence[Finding]) -> list[FindingGroup]:
    """The findings grouped by rule, most important first: severity, then task-level rules
    (:data:`LEAD_RULES`), then the order the engine gave."""
    by_rule: dict[str, list[Finding]] = {}
    for f in findings:
        by_rule.setdefault(f.rule, []).append(f)
    groups = []
    for rule, members in by_rule.items():
        commands = tuple(dict.fromkeys(c for f in members for c in f.commands))
        messages = tuple(f.message for f in members if f.message)
        groups.append(FindingGroup(rule, members[0].severity, members[0].title, tuple(evidence_lines(members)),
                                   commands, messages, _sites(members)))  # fmt: skip
    order = {g.rule: i for i, g in enumerate(groups)}
    return sorted(groups, key=lambda g: (-g.severity.rank, g.rule not in LEAD_RULES, order[g.rule]))


def verdict(report: Report, groups: Sequence[FindingGroup]) -> str:
    """One line: "healthy", or what is wrong, task-level problems first."""
    rules = {g.rule for g in groups}
    sm = report.summary
    parts = []
    bad_sites = sum(1 for s in report.sites.values() if s.nonfinite)
    if sm.nonfinite:
        parts.append(f"NaN/Inf at {_count(bad_sites, 'site')}")
    if "below-baseline" in rules:
        parts.append("task below baseline")
    if "slot-collapse" in rules:
        parts.append("slots collapsed")
    elif "slots-diffuse" in rules:
        parts.append("slot masks do not segment")
    if sm.dead:
        parts.append(f"{_count(sm.dead, 'dead channel')} at {_count(len(sm.dead_sites), 'site')}")
    if parts:
        return "; ".join(parts)
    serious = [g for g in groups if g.severity >= Severity.WARNING]
    if serious:
        return f"no dead channels at {_count(sm.sites, 'site')}, but {_count(len(serious), 'warning')}"
    dormant = f" ({sm.dormant} dormant)" if sm.dormant else ""
    return f"healthy: no dead channels at {_count(sm.sites, 'site')}{dormant}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


__all__ = ["LEAD_RULES", "FindingGroup", "SiteLine", "evidence_lines", "group_findings", "number_text", "verdict"]
