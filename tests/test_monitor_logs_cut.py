"""Monitor logs cut by a crash: the cut record is skipped with a warning, in JSONL and CSV alike, also when a
resumed run appended to the same log after it (the writers end the cut line before appending)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.integrations.writers import CsvWriter, JsonlWriter, read_log
from tests.monitor_models import StashCNN, teacher_batches, train


def _run(writer: Any, *, steps: int, start_step: int = 0) -> deadneuron.Monitor:
    torch.manual_seed(start_step)
    model = StashCNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with deadneuron.Monitor(model, every=5, optimizer=opt, writers=[writer], start_step=start_step) as mon:
        train(model, opt, teacher_batches(steps), mon.step)
    return mon


def _cut(path: Path, keep: int) -> None:
    """The log as a crash leaves it: its last ``keep`` characters of the final record lost."""
    text = path.read_text()
    path.write_text(text[: len(text) - keep])


@pytest.mark.parametrize("keep", [5, 30])
def test_a_csv_log_cut_in_its_last_row_skips_that_row_with_a_warning(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "health.csv"
    mon = _run(CsvWriter(path), steps=10)
    _cut(path, keep)  # the last row (step 10, second site) loses its end
    warned: list[str] = []
    back = read_log(path, warn=warned.append)
    assert [e["step"] for e in back] == [5, 10]
    assert back[0]["sites"].keys() == mon.entries[0]["sites"].keys()
    assert len(back[1]["sites"]) == len(mon.entries[1]["sites"]) - 1  # the cut row is not read as data
    assert len(warned) == 1 and "cut short" in warned[0]


# JSONL: the cut line was the whole step-10 snapshot; CSV: step 10 keeps the row of its first site
@pytest.mark.parametrize(("suffix", "make", "steps"), [(".jsonl", JsonlWriter, [5, 15, 20]),
                                                       (".csv", CsvWriter, [5, 10, 15, 20])])
def test_a_run_resumed_after_a_crash_appends_a_log_that_still_reads(tmp_path: Path, suffix: str, make: Any,
                                                                    steps: list[int]) -> None:
    path = tmp_path / f"health{suffix}"
    first = _run(make(path), steps=10)
    _cut(path, 20)
    second = _run(make(path), steps=10, start_step=10)  # the resumed run appends to the same log
    warned: list[str] = []
    back = read_log(path, warn=warned.append)
    assert [e["step"] for e in back] == steps
    assert back[-1]["sites"].keys() == second.entries[-1]["sites"].keys()
    assert back[0]["sites"].keys() == first.entries[0]["sites"].keys()
    assert len(warned) == 1 and "cut short" in warned[0]
    result = CliRunner().invoke(app, ["timeline", str(path)])
    assert result.exit_code == 0, result.output
    assert "step 20" in result.output
