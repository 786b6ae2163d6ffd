"""The rule settings in files: ``[tool.deadneuron]`` in the nearest pyproject.toml, then ``--config FILE``,
then the flags, parsed by `deadneuron.rules.config` (whose doc shows the tables)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deadneuron.errors import UsageError
from deadneuron.rules.config import RulesConfig, check_rule_ids, parse_deadneuron_table, parse_overrides
from deadneuron.rules.model import RuleSet


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start``: the project's, even without a deadneuron table."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc


def _config_file_table(path: Path) -> Mapping[str, Any]:
    data = read_toml(path)
    if "tool" not in data:
        return data
    table = data["tool"].get("deadneuron") if isinstance(data["tool"], Mapping) else None
    if not isinstance(table, Mapping):
        raise UsageError(f"{path} has a [tool] table but no [tool.deadneuron] table")
    return table


def load_config(
    *,
    rules: RuleSet,
    cwd: Path | None = None,
    config_file: Path | None = None,
    disable: Sequence[str] = (),
    overrides: Sequence[str] = (),
    enabled: bool = True,
) -> RulesConfig:
    """Defaults, then pyproject.toml above ``cwd``, then ``config_file``, then the flags."""
    config = RulesConfig(enabled=enabled)
    pyproject = find_pyproject(cwd if cwd is not None else Path.cwd())
    if pyproject is not None:
        tool = read_toml(pyproject).get("tool", {})
        table = tool.get("deadneuron") if isinstance(tool, Mapping) else None
        if isinstance(table, Mapping):
            config = config.then(parse_deadneuron_table(table, rules=rules, source=f"[tool.deadneuron] in {pyproject}"))
    if config_file is not None:
        config = config.then(parse_deadneuron_table(_config_file_table(config_file), rules=rules,
                                                    source=f"--config {config_file}"))
    if disable:
        ids = frozenset(check_rule_ids(disable, rules=rules, where="--disable"))
        config = config.then(RulesConfig(disabled=ids, sources=("--disable",)))
    return config.then(parse_overrides(overrides, rules=rules))


__all__ = ["find_pyproject", "load_config", "read_toml"]
