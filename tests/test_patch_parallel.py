"""`deadneuron patch --workers N`, and under torchrun: the arms x seeds runs on worker processes, or spread
over ranks, give what one process gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.cli import app

# The smallest ARC model and budget that still trains and audits something.
TINY = {"NUM_GRIDS": 8, "BATCH_SIZE": 4, "CHANNELS": 8, "SLOT_DIM": 8, "NUM_SLOTS": 3, "TIMELINE_GRIDS": 4,
        "TIMELINE_EVERY": 100, "LEARNING_RATE": 1e-2}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_arc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deadneuron.adapters import get_adapter
    from deadneuron.checkpoint import atomic_save

    path = tmp_path_factory.mktemp("arc") / "tiny.pth"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        atomic_save(get_adapter("arc-slot").train(TINY, max_steps=2), path)
    finally:
        torch.set_num_threads(before)
    return path


def _args(ckpt: Path, out: Path, workers: int) -> list[str]:
    return ["patch", str(ckpt), "--activation", "leaky", "--seeds", "2", "--max-steps", "2", "--audit-grids", "4",
            "--workers", str(workers), "--out", str(out / "patched.pth"), "--markdown", str(out / "table.md"),
            "--no-progress"]  # fmt: skip


def _patch(ckpt: Path, out: Path, workers: int) -> tuple[str, str]:
    result = CliRunner().invoke(app, _args(ckpt, out, workers))
    assert result.exit_code == 0, result.stderr
    return (out / "table.md").read_text(), result.stderr


def _kept(out: Path) -> dict[str, Any]:
    return torch.load(out / "patched.pth", weights_only=True)["state_dict"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sequential(tiny_arc: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The table and patched weights of the runs one after another in one process (--workers 1)."""
    out = tmp_path_factory.mktemp("one")
    table, _ = _patch(tiny_arc, out, 1)
    assert "| " in table  # a table, not an empty file
    return table, _kept(out)


def _same_as(sequential: tuple[str, dict[str, Any]], out: Path) -> None:
    table, weights = sequential
    # the budget line carries the wall time; every figure below it must agree to the bit
    assert (out / "table.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]
    kept = _kept(out)
    assert kept.keys() == weights.keys()
    assert all(torch.equal(kept[k], weights[k]) for k in kept)


def test_two_workers_give_the_table_of_one(tiny_arc: Path, sequential: Any, tmp_path: Path) -> None:
    _, said = _patch(tiny_arc, tmp_path, 2)
    assert "4 runs on 2 worker processes" in said
    assert "the first of 4 runs took" in said and "(trained and audited, 2 at a time)" in said
    _same_as(sequential, tmp_path)


def test_torchrun_spreads_the_runs_over_ranks(tiny_arc: Path, sequential: Any, tmp_path: Path) -> None:
    """Two gloo ranks: each trains and audits two of the four runs; rank 0 prints and writes the one table."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deadneuron",
         *_args(tiny_arc, tmp_path, 1)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training 4 runs on 2 ranks" in run.stderr
    assert run.stderr.count("plan:") == 1 and run.stdout.count("baseline vs patched") == 1  # one rank speaks
    _same_as(sequential, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patched.pth", "table.md"]


def test_workers_must_be_positive(tiny_arc: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["patch", str(tiny_arc), "--activation", "leaky", "--workers", "0",
                                      "--out", str(tmp_path / "x.pth")])  # fmt: skip
    assert result.exit_code == 2 and "--workers must be at least 1" in result.stderr


def test_a_model_of_your_own_is_not_spread_over_ranks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any rendezvous
    result = CliRunner().invoke(app, ["patch", str(tmp_path / "w.pth"), "--model", "tests.zoo:SeedEncoder",
                                      "--activation", "leaky", "--input-shape", "2,3,8,8"])  # fmt: skip
    assert result.exit_code == 2 and "run it without torchrun" in result.stderr


def test_a_rank_whose_runs_fail_stops_every_rank(tmp_path: Path) -> None:
    """Run 1 goes to rank 1 and raises there; rank 0, whose run succeeded, raises too, naming rank 1."""
    from tests import dist_helpers

    rank0, rank1 = dist_helpers.spawn(2, tmp_path, target=dist_helpers.flaky_worker)
    assert rank1 == ["ValueError", "boom on seed 1"]
    assert rank0 == ["AuditRuntimeError", "rank 1 failed while training its runs: ValueError: boom on seed 1"]
