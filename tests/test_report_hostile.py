"""A hostile or damaged report.json given to `report` or `compare` is one line and exit 4, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deadneuron", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_deeply_nested_report_is_one_line_exit_4(tmp_path: Path, command: str) -> None:
    deep = tmp_path / "report.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # json.loads recurses once per level
    args = [command, str(deep)] + ([str(deep)] if command == "compare" else [])
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 4, done.stderr[-300:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert str(deep) in done.stderr and "nested" in done.stderr


def test_a_deeply_nested_timeline_beside_a_report_is_skipped_as_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "rep"
    folder.mkdir()
    (folder / "report.json").write_text((ROOT / "tests" / "golden" / "report_a.json").read_text())
    (folder / "timeline.json").write_text("[" * 100_000 + "]" * 100_000)
    done = run("report", str(folder), "--format", "md", "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-300:]
    assert "Traceback" not in done.stderr and (tmp_path / "again" / "report.md").is_file()


@pytest.mark.parametrize(
    "text",
    ['{"step": ' + "[" * 100_000 + "]" * 100_000 + "}\n",  # JSONL: json.loads recurses once per level
     "step," + "x" * 200_000 + "\n1,2\n"],  # CSV: a field beyond the csv module's limit
    ids=["jsonl-deep", "csv-huge-field"],
)
def test_a_hostile_monitor_log_is_one_line_exit_4(tmp_path: Path, text: str) -> None:
    log = tmp_path / "monitor.log"
    log.write_text(text)
    done = run("timeline", str(log), cwd=tmp_path)
    assert done.returncode == 4, done.stderr[-300:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert str(log) in done.stderr
