"""Rule thresholds and switches: defaults, then ``[tool.deadneuron.rules]`` in the nearest pyproject.toml,
then ``--config FILE``, then flags. Each later layer overrides the one before.

The shape, in pyproject.toml (a ``--config`` file holds the same thing without the ``tool.deadneuron``
prefix: ``[rules]``, ``[rules.dead-relu]``; a pyproject.toml may also be passed as is)::

    [tool.deadneuron.rules]
    disable = ["sparse-healthy"]

    [tool.deadneuron.rules.dead-relu]
    min_channels = 2

Other keys of ``[tool.deadneuron]`` belong to other features and are left alone; inside ``rules``, an
unknown key is a UsageError that lists the valid ones. Pure: tables in, a `RulesConfig` out; the files are
read by `deadneuron.settings.load_config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from deadneuron._parse import parse_scalar
from deadneuron.errors import UsageError
from deadneuron.rules.model import Rule, RuleSet

RULES_KEY = "rules"
DISABLE_KEY = "disable"


@dataclass(frozen=True)
class RulesConfig:
    """Threshold values set above the defaults, and the rules switched off."""

    settings: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # rule id -> name -> value
    disabled: frozenset[str] = frozenset()
    enabled: bool = True  # False: evaluate no rule at all (--no-rules)
    sources: tuple[str, ...] = ()  # where the settings came from, for `deadneuron rules`

    def __post_init__(self) -> None:
        frozen = {rule: MappingProxyType(dict(values)) for rule, values in self.settings.items()}
        object.__setattr__(self, "settings", MappingProxyType(frozen))

    def thresholds_for(self, rule: Rule) -> dict[str, float]:
        return {**rule.defaults, **self.settings.get(rule.id, {})}

    def then(self, later: RulesConfig) -> RulesConfig:
        """This configuration overridden by ``later``."""
        settings = {rule: dict(values) for rule, values in self.settings.items()}
        for rule, values in later.settings.items():
            settings.setdefault(rule, {}).update(values)
        return RulesConfig(settings, self.disabled | later.disabled, self.enabled and later.enabled,
                           (*self.sources, *later.sources))


def parse_deadneuron_table(table: Mapping[str, Any], *, rules: RuleSet, source: str) -> RulesConfig:
    """The ``[tool.deadneuron]`` table (or a --config file's top level): only its ``rules`` part is ours."""
    names = {t.name for rule in rules for t in rule.thresholds}
    misplaced = sorted(k for k in table if k in rules.ids or k in names or k == DISABLE_KEY)
    if misplaced:
        raise UsageError(f"{source}: {', '.join(misplaced)} must go under the rules table "
                         f"([tool.deadneuron.rules] in pyproject.toml, [rules] in a --config file)")
    section = table.get(RULES_KEY, {})
    if not isinstance(section, Mapping):
        raise UsageError(f"{source}: 'rules' must be a table, got {type(section).__name__}")
    return parse_rules_table(section, rules=rules, source=source)


def parse_rules_table(section: Mapping[str, Any], *, rules: RuleSet, source: str) -> RulesConfig:
    settings: dict[str, dict[str, float]] = {}
    disabled: frozenset[str] = frozenset()
    for key, value in section.items():
        if key == DISABLE_KEY:
            disabled = frozenset(check_rule_ids(_strings(value, f"{source}: disable"), rules=rules, where=source))
        elif key in rules:
            settings[key] = _thresholds(rules.get(key), value, f"{source}, rule {key!r}")
        else:
            raise UsageError(f"{source}: unknown key {key!r} in the rules table; valid keys: "
                             f"{', '.join((DISABLE_KEY, *rules.ids))}")
    return RulesConfig(settings, disabled, sources=(source,) if section else ())


def _thresholds(rule: Rule, values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise UsageError(f"{where}: expected a table of thresholds, got {values!r}")
    valid = [t.name for t in rule.thresholds]
    out = {}
    for name, value in values.items():
        if name not in valid:
            raise UsageError(f"{where}: unknown threshold {name!r}; valid keys: {', '.join(valid) or '(none)'}")
        out[name] = rule.threshold(name).validate(value, where=where)
    return out


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{where} must be a list of rule ids, got {value!r}")


def check_rule_ids(ids: Iterable[str], *, rules: RuleSet, where: str) -> list[str]:
    ids = list(ids)
    unknown = [i for i in ids if i not in rules]
    if unknown:
        raise UsageError(f"{where}: unknown rule {', '.join(map(repr, unknown))}; valid rules: {', '.join(rules.ids)}")
    return ids


def parse_overrides(items: Sequence[str], *, rules: RuleSet, source: str = "flags") -> RulesConfig:
    """``["dead-relu.min_channels=2", ...]`` (the flags layer)."""
    settings: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        rule_id, dot, name = key.strip().rpartition(".")
        if not sep or not dot:
            raise UsageError(f"{source}: {item!r} is not RULE.THRESHOLD=VALUE (e.g. dead-relu.min_channels=2)")
        check_rule_ids([rule_id], rules=rules, where=source)
        rule = rules.get(rule_id)
        settings.setdefault(rule_id, {}).update(_thresholds(rule, {name: parse_scalar(raw.strip())}, source))
    return RulesConfig(settings, sources=(source,) if items else ())
