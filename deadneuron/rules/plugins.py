"""Third-party rules from the entry-point group ``deadneuron.rules``.

An entry point may load a Rule, an iterable of Rules, or a zero-argument callable returning either::

    [project.entry-points."deadneuron.rules"]
    my-rules = "mypkg.rules:RULES"
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from typing import Any

from deadneuron.rules.builtin import builtin_rules
from deadneuron.rules.model import Rule, RuleError, RuleSet

ENTRY_POINT_GROUP = "deadneuron.rules"


def _as_rules(obj: Any, origin: str) -> list[Rule]:
    if callable(obj) and not isinstance(obj, Rule):
        try:
            obj = obj()
        except Exception as exc:
            raise RuleError(f"{origin}: calling it raised {type(exc).__name__}: {exc}") from exc
    items = [obj] if isinstance(obj, Rule) else list(obj) if isinstance(obj, Iterable) else [obj]
    bad = [type(item).__name__ for item in items if not isinstance(item, Rule)]
    if bad:
        raise RuleError(f"{origin} yielded {', '.join(bad)}, not deadneuron.rules.Rule")
    return items


def plugin_rules() -> list[tuple[str, Rule]]:
    """(entry point description, rule) for every installed third-party rule."""
    out: list[tuple[str, Rule]] = []
    # Looked up through the module attribute, so tests can monkeypatch importlib.metadata.entry_points.
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"rule entry point {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise RuleError(f"{origin} failed to load: {type(exc).__name__}: {exc}") from exc
        out.extend((origin, rule) for rule in _as_rules(obj, origin))
    return out


def load_rules() -> RuleSet:
    """The built-in rules followed by every installed third-party rule."""
    rules = builtin_rules()
    for origin, rule in plugin_rules():
        if rule.id in rules:
            raise RuleError(f"{origin} defines rule {rule.id!r}, which is already defined; rename it")
        rules = rules.plus([rule])
    return rules
