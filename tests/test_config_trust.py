"""The pyproject.toml found by walking up from the working folder is read only where nobody else could
have written it: a file another user owns, a file others can write, or one in a folder above which others
can rename entries (no sticky bit) is ignored with one warning line, and the built-in thresholds apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deadneuron.rules import builtin_rules
from deadneuron.settings import load_config

RULES = builtin_rules()
ROOT = Path(__file__).resolve().parent.parent
DISABLING = '[tool.deadneuron.rules]\ndisable = ["dead-relu"]\n\n[tool.deadneuron.rules.dead-relu]\nmin_channels = 7\n'


def planted(tmp_path: Path, *, folder_mode: int = 0o755, file_mode: int = 0o644) -> Path:
    """A pyproject.toml in ``tmp_path/shared`` (folder_mode), and the working folder below it."""
    shared = tmp_path / "shared"
    work = shared / "me"
    work.mkdir(parents=True)
    (shared / "pyproject.toml").write_text(DISABLING)
    (shared / "pyproject.toml").chmod(file_mode)
    shared.chmod(folder_mode)
    return work


def collect(messages: list[str]):  # noqa: ANN201
    return messages.append


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
OTHER_ID = 65534


@pytest.mark.parametrize(
    ("folder_mode", "file_mode", "why"),
    [(0o777, 0o644, "writable by"), (0o755, 0o666, "writable by"), (0o1777, 0o646, "writable by")],
)
def test_a_pyproject_others_could_write_is_ignored(tmp_path: Path, folder_mode: int, file_mode: int, why: str) -> None:
    work = planted(tmp_path, folder_mode=folder_mode, file_mode=file_mode)
    warned: list[str] = []
    config = load_config(rules=RULES, cwd=work, warn=collect(warned))
    assert not config.disabled
    assert config.thresholds_for(RULES.get("dead-relu"))["min_channels"] == 1
    assert len(warned) == 1 and "pyproject.toml" in warned[0] and why in warned[0] and "ignored" in warned[0]


@pytest.mark.skipif(not AS_ROOT, reason="giving a folder to another group needs root")
def test_a_folder_writable_by_a_shared_group_is_not_trusted(tmp_path: Path) -> None:
    work = planted(tmp_path, folder_mode=0o775)
    os.chown(work.parent, -1, OTHER_ID)
    warned: list[str] = []
    config = load_config(rules=RULES, cwd=work, warn=collect(warned))
    assert not config.disabled and len(warned) == 1 and "writable by its group" in warned[0]


def test_a_pyproject_without_a_deadneuron_table_is_skipped_quietly(tmp_path: Path) -> None:
    work = planted(tmp_path, folder_mode=0o777)
    (work.parent / "pyproject.toml").write_text("this is [not toml")
    warned: list[str] = []
    config = load_config(rules=RULES, cwd=work, warn=collect(warned))
    assert not config.disabled and not warned


def test_a_sticky_world_writable_folder_keeps_ones_own_pyproject(tmp_path: Path) -> None:
    warned: list[str] = []
    config = load_config(rules=RULES, cwd=planted(tmp_path, folder_mode=0o1777), warn=collect(warned))
    assert config.disabled == {"dead-relu"} and not warned


@pytest.mark.skipif(not AS_ROOT, reason="chown to another user needs root")
def test_a_pyproject_owned_by_another_user_is_ignored(tmp_path: Path) -> None:
    work = planted(tmp_path, folder_mode=0o1777)
    os.chown(work.parent / "pyproject.toml", OTHER_ID, -1)
    warned: list[str] = []
    config = load_config(rules=RULES, cwd=work, warn=collect(warned))
    assert not config.disabled and len(warned) == 1 and "owned by uid 65534" in warned[0]


def test_the_rules_command_says_so_on_one_line(tmp_path: Path) -> None:
    work = planted(tmp_path, folder_mode=0o777)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "deadneuron", "rules", "--format", "json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in json.loads(done.stdout)}
    assert rows["dead-relu"]["enabled"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(work.parent / "pyproject.toml") in lines[0] and "--config" in lines[0]
