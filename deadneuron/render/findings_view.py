"""What a report's findings say at a glance: a one-line verdict, and one group per rule.

The rule engine gives one finding per site (or per module shared by several sites), each with a long
message, its evidence and the commands that try the fix. A reader wants the answer first: this module
groups the findings of one rule into a :class:`FindingGroup` (one line per site, the evidence in numbers,
each distinct command once), ranks the groups so that task-level findings (below the trivial baseline,
collapsed slots, NaN/Inf) come before per-site channel warnings of the same severity, and words the
verdict. Pure: values in, values out; the renderers decide how the lines look.

Findings may be plain mappings (``Report.findings`` from JSON) or objects with the same attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from deadneuron.report import Report

SEVERITY_ORDER = {"error": 0, "critical": 0, "warning": 1, "info": 2}
# Findings about the task or the whole model: ranked above per-site findings of the same severity.
LEAD_RULES = ("nonfinite", "below-baseline", "slot-collapse")
_SHARE_WORDS = ("fraction", "share", "accuracy", "sparsity")


def field_of(finding: Any, name: str, default: Any = None) -> Any:
    """``finding[name]`` for a mapping, ``finding.name`` for an object; Enum values as their value."""
    value = finding.get(name, default) if isinstance(finding, Mapping) else getattr(finding, name, default)
    return value.value if isinstance(value, Enum) else value


def severity_of(finding: Any) -> str:
    return str(field_of(finding, "severity", "info") or "info")


def title_of(finding: Any) -> str:
    return str(field_of(finding, "title") or field_of(finding, "rule") or field_of(finding, "id") or "finding")


def rule_of(finding: Any) -> str:
    return str(field_of(finding, "rule") or field_of(finding, "id") or title_of(finding))


def commands_of(finding: Any) -> list[str]:
    commands = field_of(finding, "commands") or ()
    return [commands] if isinstance(commands, str) else [str(c) for c in commands]


@dataclass(frozen=True)
class SiteLine:
    """One line of a group: a site (empty for model-wide evidence) and what was measured there."""

    site: str
    text: str


@dataclass(frozen=True)
class FindingGroup:
    """Every finding of one rule: one line per site, each distinct command once, the full messages."""

    rule: str
    severity: str
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


def number_text(metric: str, value: Any) -> str:
    """A measured value as the reader expects it: shares in %, counts whole, the rest 3 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if _is_share(metric):
        return f"{100 * value:.1f}%"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.2f}" if 0.01 <= abs(value) < 100 else f"{value:.3g}"


def _evidence(finding: Any) -> list[tuple[str | None, str, Any, Any, str]]:
    """(site, metric, observed, threshold, comparison) of each evidence entry."""
    out = []
    for e in field_of(finding, "evidence") or ():
        site = field_of(e, "site")
        out.append((None if site is None else str(site), str(field_of(e, "metric", "")), field_of(e, "observed"),
                    field_of(e, "threshold"), str(field_of(e, "comparison", ""))))  # fmt: skip
    return out


def evidence_lines(findings: Sequence[Any]) -> list[SiteLine]:
    """One line per site (its observed values) and one line for the model-wide evidence (with the limits
    that made the rule fire: ``observed <comparison> threshold``)."""
    per_site: dict[str, list[str]] = {}
    overall: list[str] = []
    for f in findings:
        for site, metric, observed, threshold, comparison in _evidence(f):
            name = metric.replace("_", " ")
            if site is None:
                limit = f" {comparison} {number_text(metric, threshold)}" if comparison else ""
                overall.append(f"{name} {number_text(metric, observed)}{limit}")
            else:
                per_site.setdefault(site, []).append(f"{name} {number_text(metric, observed)}")
    lines = [SiteLine(site, ", ".join(texts)) for site, texts in per_site.items()]
    return ([SiteLine("", "; ".join(overall))] if overall else []) + lines


def _sites(findings: Sequence[Any]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(s) for f in findings for s in field_of(f, "sites") or ()))


def group_findings(findings: Sequence[Any]) -> list[FindingGroup]:
    """The findings grouped by rule, most important first: severity, then task-level rules
    (:data:`LEAD_RULES`), then the order the engine gave."""
    by_rule: dict[str, list[Any]] = {}
    for f in findings:
        by_rule.setdefault(rule_of(f), []).append(f)
    groups = []
    for rule, members in by_rule.items():
        commands = tuple(dict.fromkeys(c for f in members for c in commands_of(f)))
        messages = tuple(str(field_of(f, "message") or "") for f in members)
        groups.append(FindingGroup(rule, severity_of(members[0]), title_of(members[0]), tuple(evidence_lines(members)),
                                   commands, tuple(m for m in messages if m), _sites(members)))  # fmt: skip
    order = {g.rule: i for i, g in enumerate(groups)}
    return sorted(groups, key=lambda g: (SEVERITY_ORDER.get(g.severity, 3), g.rule not in LEAD_RULES, order[g.rule]))


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
    serious = [g for g in groups if SEVERITY_ORDER.get(g.severity, 3) <= SEVERITY_ORDER["warning"]]
    if serious:
        return f"no dead channels at {_count(sm.sites, 'site')}, but {_count(len(serious), 'warning')}"
    dormant = f" ({sm.dormant} dormant)" if sm.dormant else ""
    return f"healthy: no dead channels at {_count(sm.sites, 'site')}{dormant}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


__all__ = ["LEAD_RULES", "FindingGroup", "SiteLine", "evidence_lines", "field_of", "group_findings",
           "number_text", "verdict"]  # fmt: skip
