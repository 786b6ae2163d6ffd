"""Advice printed by `deadneuron patch` must be advice the user can follow as printed.

Without ``--train`` the patch only does surgery and ``--seeds`` is refused, so the table must not tell the
user to "use --seeds 3" (nor label the column with a seed count); with ``--train`` and one seed it must.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

OWN = Path(__file__).resolve().parent / "own_cnn.py"
ROOT = Path(__file__).resolve().parent.parent


def cli(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "deadneuron", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _ckpt(folder: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_cnn_advice", OWN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    path = folder / "own model.pth"
    torch.save(module.build().state_dict(), path)
    return path


def test_surgery_only_does_not_advise_a_flag_it_refuses(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    base = ["patch", ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--activation", "leaky"]
    done = cli(tmp_path, *base, "--out", tmp_path / "p.pth")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.pth").is_file()
    assert "--seeds" not in done.stdout and "1 seed" not in done.stdout, done.stdout
    # what the advice would have asked for is indeed refused here
    refused = cli(tmp_path, *base, "--seeds", "3", "--out", tmp_path / "q.pth")
    assert refused.returncode == 2 and "--seeds" in refused.stderr


def test_one_trained_seed_still_advises_more_seeds(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    done = cli(tmp_path, "patch", ckpt, "--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--train",
               f"{OWN}:train", "--max-steps", "2", "--seeds", "1", "--workers", "1", "--activation", "leaky",
               "--out", tmp_path / "p.pth")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "use --seeds 3" in done.stdout
