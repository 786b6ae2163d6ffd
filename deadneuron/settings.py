"""The rule settings in files: ``[tool.deadneuron]`` in the nearest pyproject.toml, then ``--config FILE``,
then the flags, parsed by `deadneuron.rules.config` (whose doc shows the tables).

The pyproject.toml is found implicitly, by walking up from the working folder, so it is read only where
nobody else could have written it (`deadneuron._cache.untrusted_file_reason`): a file in a shared folder
(``/tmp``, a group-writable checkout) or owned by another user is ignored with a warning, and the walk
stops there. A ``--config`` file is named explicitly and always read."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deadneuron._cache import untrusted_file_reason
from deadneuron.errors import UnreadableInputError, UsageError
from deadneuron.rules.config import RulesConfig, check_rule_ids, parse_deadneuron_table, parse_overrides
from deadneuron.rules.model import RuleSet


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start``: the project's, even without a deadneuron table."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _warn_to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _trusted_pyproject(path: Path | None, warn: Callable[[str], None]) -> Path | None:
    """``path`` if nobody but this user (or root) could have written it; else None, with a warning where
    it holds a [tool.deadneuron] table (another project's file is skipped quietly)."""
    if path is None:
        return None
    try:
        reason = untrusted_file_reason(path)
    except OSError as exc:
        reason = f"cannot check who owns it ({exc.strerror or exc})"
    if reason is None:
        return path
    try:
        with path.open("rb") as handle:
            tool = tomllib.load(handle).get("tool")
    except (OSError, tomllib.TOMLDecodeError):
        tool = None  # unreadable or malformed: not ours to judge, and it must not stop the command
    if isinstance(tool, Mapping) and "deadneuron" in tool:
        warn(f"{path}: [tool.deadneuron] ignored: another user could have written it ({reason}); the built-in "
             "thresholds apply: pass --config FILE to use a file anyway")  # fmt: skip
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


def read_config_file(path: Path) -> dict[str, Any]:
    """The ``--config`` file as TOML. A file that is missing, a folder, unreadable or not valid TOML is
    unreadable input (UnreadableInputError, exit 4): one line naming the option and the path."""
    where = f"--config {path}"
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UnreadableInputError(f"{where}: no such file; check the path") from None
    except IsADirectoryError:
        raise UnreadableInputError(f"{where}: is a folder, not a TOML file; give the file inside it") from None
    except PermissionError:
        raise UnreadableInputError(f"{where}: permission denied; make the file readable (chmod +r)") from None
    except OSError as exc:
        raise UnreadableInputError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UnreadableInputError(f"{where}: not a text file (not UTF-8): not valid TOML; give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UnreadableInputError(f"{where}: not valid TOML ({exc}); fix the file") from None


def _config_file_table(path: Path) -> Mapping[str, Any]:
    data = read_config_file(path)
    if "tool" not in data:
        return data
    table = data["tool"].get("deadneuron") if isinstance(data["tool"], Mapping) else None
    if not isinstance(table, Mapping):
        raise UsageError(f"--config {path}: has a [tool] table but no [tool.deadneuron] table")
    return table


def load_config(
    *,
    rules: RuleSet,
    cwd: Path | None = None,
    config_file: Path | None = None,
    disable: Sequence[str] = (),
    overrides: Sequence[str] = (),
    enabled: bool = True,
    warn: Callable[[str], None] = _warn_to_stderr,
) -> RulesConfig:
    """Defaults, then pyproject.toml above ``cwd`` (if nobody else could have written it: else ``warn``
    says it is ignored), then ``config_file``, then the flags."""
    config = RulesConfig(enabled=enabled)
    pyproject = _trusted_pyproject(find_pyproject(cwd if cwd is not None else Path.cwd()), warn)
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


__all__ = ["find_pyproject", "load_config", "read_config_file", "read_toml"]
