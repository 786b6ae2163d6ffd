"""List every rule: id, severity, what it reads, and its thresholds (defaults, then pyproject.toml, then --config).

Thresholds are set in pyproject.toml under [tool.deadneuron.rules.RULE_ID] (e.g. min_channels = 2), rules
switched off with [tool.deadneuron.rules] disable = ["RULE_ID"], or the same in a --config FILE under [rules].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from deadneuron.errors import UsageError


def rules_command(
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table (rich) or json.")] = "table",
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML file of thresholds (a [rules] table), read after pyproject.toml.")] = None,
) -> None:
    from deadneuron.rules import load_rules
    from deadneuron.settings import load_config

    if fmt not in ("table", "json"):
        raise UsageError(f"--format takes table or json, not {fmt!r}")
    rules = load_rules()
    config = load_config(rules=rules, config_file=config_file)
    rows = [_row(rule, config) for rule in rules]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    _print_table(rows, config.sources)


def _row(rule: Any, config: Any) -> dict[str, Any]:
    values = config.thresholds_for(rule)
    return {
        "id": rule.id,
        "title": rule.title,
        "severity": rule.severity.value,
        "enabled": rule.id not in config.disabled,
        "reads": list(rule.reads),
        "thresholds": [
            {"name": t.name, "value": values[t.name], "default": t.default, "help": t.help}
            for t in rule.thresholds
        ],
    }


def _print_table(rows: list[dict[str, Any]], sources: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from deadneuron.render.terminal import SEVERITY_STYLE
    from deadneuron.rules import Severity

    table = Table(title="deadneuron rules", title_justify="left", pad_edge=False, show_lines=True, expand=True)
    table.add_column("id", overflow="fold", ratio=2)
    table.add_column("severity", no_wrap=True, min_width=7)
    table.add_column("reads", overflow="fold", ratio=2)
    table.add_column("thresholds", overflow="fold", ratio=3)
    for row in rows:
        thresholds = Text()
        for i, t in enumerate(row["thresholds"]):
            changed = t["value"] != t["default"]
            thresholds.append(("\n" if i else "") + f"{t['name']} = {t['value']:g}", style="bold" if changed else "")
            thresholds.append(f" (default {t['default']:g})" if changed else "", style="dim")
            thresholds.append(f"  {t['help']}", style="dim")
        ident = Text(row["id"] + ("" if row["enabled"] else " (disabled)"), style="bold" if row["enabled"] else "dim")
        ident.append("\n" + row["title"], style="dim")
        table.add_row(ident, Text(row["severity"], style=SEVERITY_STYLE[Severity(row["severity"])]),
                      "\n".join(row["reads"]), thresholds)
    console = Console()
    console.print(table)
    if sources:
        console.print(Text("settings from: " + "; ".join(sources), style="dim"))
