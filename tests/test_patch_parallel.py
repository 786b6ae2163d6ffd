"""`deadneuron patch --workers N`: the arms x seeds runs on worker processes give what one process gives."""

from __future__ import annotations

from pathlib import Path

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


def _patch(ckpt: Path, out: Path, workers: int) -> tuple[str, str]:
    args = ["patch", str(ckpt), "--activation", "leaky", "--seeds", "2", "--max-steps", "2", "--audit-grids", "4",
            "--workers", str(workers), "--out", str(out / "patched.pth"), "--markdown", str(out / "table.md"),
            "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return (out / "table.md").read_text(), result.stderr


def test_two_workers_give_the_table_of_one(tiny_arc: Path, tmp_path: Path) -> None:
    (one := tmp_path / "one").mkdir()
    (two := tmp_path / "two").mkdir()
    table_one, _ = _patch(tiny_arc, one, 1)
    table_two, said = _patch(tiny_arc, two, 2)
    assert "4 runs on 2 worker processes" in said
    # the budget line carries the wall time; every figure below it must agree to the bit
    assert table_one.split("\n", 1)[1] == table_two.split("\n", 1)[1]
    assert "| " in table_one  # a table, not an empty file
    kept = [torch.load(d / "patched.pth", weights_only=True)["state_dict"] for d in (one, two)]
    assert kept[0].keys() == kept[1].keys()
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])


def test_workers_must_be_positive(tiny_arc: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["patch", str(tiny_arc), "--activation", "leaky", "--workers", "0",
                                      "--out", str(tmp_path / "x.pth")])  # fmt: skip
    assert result.exit_code == 2 and "--workers must be at least 1" in result.stderr
