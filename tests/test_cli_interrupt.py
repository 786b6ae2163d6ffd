"""Ctrl-C during a command (here an audit, mid-data): one line on stderr saying so, exit 130, no traceback,
and the report folder of an earlier run left as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

FACTORIES = '''
import pathlib
import time

import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU())


def slow():
    for _ in range(200):
        pathlib.Path("started").touch()
        time.sleep(0.1)
        yield torch.randn(2, 3)
'''


def test_ctrl_c_mid_audit_says_so_in_one_line_and_exits_130(tmp_path: Path) -> None:
    (tmp_path / "factories.py").write_text(textwrap.dedent(FACTORIES))
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU()).state_dict(), tmp_path / "model.pth")
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's report: untouched by the interrupted one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "deadneuron", "audit", "model.pth", "--model", "factories:build",
            "--data", "factories:slow", "--out", "report", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted by Ctrl-C" in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert (out / "report.json").read_text() == "{}"
