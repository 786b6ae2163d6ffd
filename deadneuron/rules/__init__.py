"""deadneuron.rules: turn a Report into findings a researcher can act on (DESIGN section 5).

    from deadneuron.rules import attach_findings, context_from, evaluate
    findings = evaluate(report, context_from(checkpoint, model))   # deadneuron.audit(..., rules=True) does this
    report = report.with_findings(findings)

Rules are data (``Rule``); third-party rules come in through the entry-point group ``deadneuron.rules``;
thresholds come from the defaults, ``[tool.deadneuron.rules]`` in pyproject.toml, ``--config FILE`` and
flags (``deadneuron.settings.load_config`` reads the files).
"""

from deadneuron.rules.builtin import BUILTIN_RULES, builtin_rules
from deadneuron.rules.config import RulesConfig, parse_overrides, parse_rules_table
from deadneuron.rules.context import BatchNormScale, RuleContext, context_from
from deadneuron.rules.engine import attach_findings, evaluate, make_finding
from deadneuron.rules.finding import Finding
from deadneuron.rules.model import (
    Evidence,
    Fix,
    Hit,
    Rule,
    RuleError,
    RuleSet,
    Severity,
    Threshold,
)
from deadneuron.rules.plugins import ENTRY_POINT_GROUP, load_rules
from deadneuron.rules.target import PatchTarget, Preview, surgery_preview

__all__ = [
    "BUILTIN_RULES",
    "ENTRY_POINT_GROUP",
    "BatchNormScale",
    "Evidence",
    "Finding",
    "Fix",
    "Hit",
    "PatchTarget",
    "Preview",
    "Rule",
    "RuleContext",
    "RuleError",
    "RuleSet",
    "RulesConfig",
    "Severity",
    "Threshold",
    "attach_findings",
    "builtin_rules",
    "context_from",
    "evaluate",
    "load_rules",
    "make_finding",
    "parse_overrides",
    "parse_rules_table",
    "surgery_preview",
]
