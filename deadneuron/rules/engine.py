"""The engine: a Report and a RuleContext in, Findings out, most severe first (DESIGN section 5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deadneuron.report import Report
from deadneuron.rules.config import RulesConfig
from deadneuron.rules.context import RuleContext, context_from
from deadneuron.rules.finding import Finding
from deadneuron.rules.model import Fix, Hit, Rule, RuleError, RuleSet
from deadneuron.rules.target import PatchTarget

if TYPE_CHECKING:
    from torch import nn


def evaluate(
    report: Report,
    context: RuleContext | None = None,
    *,
    rules: RuleSet | None = None,
    config: RulesConfig | None = None,
    target: PatchTarget | None = None,
) -> list[Finding]:
    """Every finding of ``rules`` (default: built-in and installed third-party rules) on ``report``.

    Sorted by severity, most severe first; rule order, then the predicate's order, break ties. With a
    ``target`` (the subject ``deadneuron patch`` would patch) a finding keeps only the fixes that apply to
    it exactly, its commands name the subject in full, and it says why any other fix is not suggested;
    without one every fix is kept and its command names ``report.meta["source"]``; a report that names no
    source (the Python API's) gets no command: none could name its model."""
    if rules is None:
        from deadneuron.rules.plugins import load_rules

        rules = load_rules()
    config = config if config is not None else RulesConfig()
    if not config.enabled:
        return []
    context = context if context is not None else RuleContext()
    source = report.meta.get("source")
    findings: list[Finding] = []
    for rule in rules:
        if rule.id in config.disabled:
            continue
        thresholds = config.thresholds_for(rule)
        for hit in _hits(rule, report, context, thresholds):
            findings.append(make_finding(rule, hit, context, thresholds, source=source if isinstance(source, str) else None,
                                         target=target, report=report))
    return sorted(findings, key=lambda f: -f.severity.rank)


def _hits(rule: Rule, report: Report, context: RuleContext, thresholds: Mapping[str, float]) -> Sequence[Hit]:
    try:
        hits = list(rule.predicate(report, context, thresholds))
    except Exception as exc:
        raise RuleError(f"rule {rule.id!r} raised {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(h, Hit) for h in hits):
        raise RuleError(f"rule {rule.id!r}: its predicate must return Hit values")
    return hits


def _render(template: str, values: Mapping[str, Any], rule: Rule) -> str:
    try:
        return template.format_map(values)
    except (KeyError, IndexError, ValueError) as exc:
        raise RuleError(f"rule {rule.id!r}: cannot render its text from the evidence ({type(exc).__name__}: {exc})") from exc


def make_finding(rule: Rule, hit: Hit, context: RuleContext, thresholds: Mapping[str, float], *,
                 source: str | None = None, target: PatchTarget | None = None, report: Report | None = None) -> Finding:
    """One hit of ``rule`` as a Finding: sentences rendered from its values, fixes with their commands
    (checked against ``target``, with ``report``, where given)."""
    text = _render(rule.message, hit.values, rule)
    if rule.suggestion:
        text = f"{text} {_render(rule.suggestion, hit.values, rule)}"
    try:
        fixes = tuple(rule.fixes(hit, context, thresholds))
    except Exception as exc:
        raise RuleError(f"rule {rule.id!r}: building its fixes raised {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(f, Fix) for f in fixes):
        raise RuleError(f"rule {rule.id!r}: its fixes must be Fix values")
    withheld: tuple[str, ...] = ()
    if target is not None and report is not None:
        fixes, commands, withheld = _checked(fixes, target, report)
        if withheld:
            text = f"{text} Not suggested for this model: {'; '.join(withheld)}."
    else:  # no subject known (a report of the Python API): no command could name it
        commands = tuple(fix.command(source, adapter_model=context.adapter is not None) for fix in fixes) if source else ()
    return Finding(
        rule=rule.id,
        severity=rule.severity,
        title=rule.title,
        message=text,
        sites=hit.sites,
        channels=hit.channels,
        evidence=hit.evidence,
        fixes=fixes,
        commands=commands,
        withheld=withheld,
    )


def _checked(fixes: Sequence[Fix], target: PatchTarget, report: Report) -> tuple[tuple[Fix, ...], tuple[str, ...], tuple[str, ...]]:
    """The fixes that apply to ``target``, their commands, and why each other fix does not apply."""
    kept: list[Fix] = []
    commands: list[str] = []
    withheld: list[str] = []
    for fix in fixes:
        reason = target.check(report, fix)
        if reason is not None:
            withheld.append(reason)
            continue
        kept.append(fix)
        command = target.command(fix)
        if command is not None:
            commands.append(command)
    return tuple(kept), tuple(commands), tuple(withheld)


def attach_findings(
    report: Report,
    checkpoint: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    rules: RuleSet | None = None,
    config: RulesConfig | None = None,
    target: PatchTarget | None = None,
) -> Report:
    """``report`` with the findings of ``rules`` on it, given what ``checkpoint`` and ``model`` know."""
    findings = evaluate(report, context_from(checkpoint, model), rules=rules, config=config, target=target)
    return report.with_findings(findings)
