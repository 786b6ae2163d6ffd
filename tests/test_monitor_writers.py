"""Writers of deadneuron.Monitor (JSONL, CSV, TensorBoard) read back, and `deadneuron timeline PATH` (a log or
a checkpoint that carries a health timeline)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.errors import UnreadableInputError, UsageError
from deadneuron.integrations.writers import CsvWriter, JsonlWriter, TensorBoardWriter, read_log
from tests.monitor_models import StashCNN, teacher_batches, train

PNG = b"\x89PNG\r\n\x1a\n"


def _run(*writers: Any, steps: int = 20) -> deadneuron.Monitor:
    torch.manual_seed(0)
    model = StashCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    with deadneuron.Monitor(model, every=5, optimizer=opt, writers=writers) as mon:
        train(model, opt, teacher_batches(steps), mon.step)
    return mon


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_jsonl_round_trips_every_snapshot_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "health.jsonl"
    first = _run(JsonlWriter(path))
    assert read_log(path) == first.entries
    assert len(first.entries) == 4 and first.entries[-1]["sites"]["bn>relu"]["dead_channels"]
    second = _run(JsonlWriter(path), steps=10)  # a resumed run appends
    assert read_log(path) == first.entries + second.entries


def test_csv_round_trips_the_site_figures(tmp_path: Path) -> None:
    path = tmp_path / "health.csv"
    mon = _run(CsvWriter(path))
    text = path.read_text()
    assert text.count("step,first_step") == 1 and len(text.splitlines()) == 1 + 4 * 2
    back = read_log(path)
    assert [e["step"] for e in back] == [5, 10, 15, 20]
    for entry, original in zip(back, mon.entries, strict=True):
        assert entry["learning_rate"] == original["learning_rate"]
        for site, values in entry["sites"].items():
            want = original["sites"][site]
            for key, value in values.items():
                expected = want[key] if want[key] is not None else float("nan")
                assert _same(value, expected) or value == pytest.approx(expected), (site, key)


def test_a_cut_last_line_is_skipped_with_a_warning_and_a_foreign_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "health.jsonl"
    mon = _run(JsonlWriter(path), steps=10)
    with path.open("a") as f:
        f.write('{"step": 15, "sites": {"bn>re')
    warned: list[str] = []
    assert read_log(path, warn=warned.append) == mon.entries
    assert "line 3 is cut short" in warned[0]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(UnreadableInputError, match="not a deadneuron monitor log"):
        read_log(other)
    with pytest.raises(UsageError, match="other columns"):
        CsvWriter(other)
    with pytest.raises(UsageError, match="does not exist"):
        JsonlWriter(tmp_path / "missing" / "log.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_scalars_and_firing_histograms(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = _run(TensorBoardWriter(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    dead = [(e.step, e.value) for e in events.Scalars("deadneuron/dead/bn>relu")]
    assert dead == [(s.step, float(s.sites["bn>relu"].dead)) for s in mon.snapshots]
    total = [e.value for e in events.Scalars("deadneuron/dead/all")]
    assert total == [float(s.dead) for s in mon.snapshots]
    firing = events.Histograms("deadneuron/firing_rate/bn>relu")
    assert [h.step for h in firing] == [5, 10, 15, 20]
    assert firing[-1].histogram_value.num == 64  # one value per channel


def _invoke(argv: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}") from result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_timeline_command_draws_the_figure_from_a_log(tmp_path: Path, suffix: str) -> None:
    log = tmp_path / f"health.{suffix}"
    mon = _run(JsonlWriter(log) if suffix == "jsonl" else CsvWriter(log))
    code, out, err = _invoke(["timeline", str(log), "--out", str(tmp_path / "fig.png")])
    assert code == 0, err
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG)
    code, out, err = _invoke(["timeline", str(log)])
    last = mon.snapshots[-1].sites["bn>relu"]
    assert code == 0 and "step 20: 2 sites" in out
    assert any(line.split()[:3] == ["bn>relu", "64", str(last.dead)] for line in out.splitlines()), out


@pytest.mark.parametrize(("make", "argv", "code", "says"), [
    (None, [], 4, "no such monitor log"),  # as for every input file that is missing (docs/cli.md)
    ("garbage", [], 4, "not JSON"),
    ("log", ["--out", "fig.txt"], 2, "PNG"),
    ("log", ["--out", "missing/fig.png"], 2, "does not exist"),
], ids=["missing", "garbage", "not-png", "no-folder"])  # fmt: skip
def test_timeline_command_bad_inputs(tmp_path: Path, make: str | None, argv: list[str], code: int, says: str) -> None:
    log = tmp_path / "health.jsonl"
    if make == "garbage":
        log.write_text("{nope\n{}\n")
    elif make == "log":
        _run(JsonlWriter(log), steps=5)
    argv = [a if not a.endswith(("txt", "png")) else str(tmp_path / a) for a in argv]
    got, _out, err = _invoke(["timeline", str(log), *argv])
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("deadneuron: error: ") and says in lines[0], err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.txt"))


ROOT = Path(__file__).resolve().parents[1]


def test_timeline_command_draws_a_checkpoint_s_health_timeline(tmp_path: Path) -> None:
    demo = ROOT / "checkpoints" / "slot_attention.pth"
    code, out, err = _invoke(["timeline", str(demo), "--out", str(tmp_path / "fig.png")])
    assert code == 0, err
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG)
    last = torch.load(demo, map_location="cpu", weights_only=True)["health_timeline"][-1]
    code, out, err = _invoke(["timeline", str(demo)])
    assert code == 0 and f"step {last['step']}: {len(last['sites'])} sites" in out, err
    for site, figures in last["sites"].items():  # the dead count printed is that of the stored ids
        assert any(line.split()[:3] == [site, str(figures["channels"]), str(len(figures["dead_channels"]))]
                   for line in out.splitlines()), (site, out)  # fmt: skip


def test_timeline_command_reads_a_checkpoint_that_stores_a_monitor_s_entries(tmp_path: Path) -> None:
    mon = _run(steps=10)
    path = tmp_path / "run.pth"
    torch.save({"state_dict": {}, "health_timeline": mon.entries}, path)
    code, out, err = _invoke(["timeline", str(path), "--out", str(tmp_path / "fig.png")])
    assert code == 0 and (tmp_path / "fig.png").read_bytes().startswith(PNG), err
    code, out, err = _invoke(["timeline", str(path)])
    last = mon.snapshots[-1].sites["bn>relu"]
    assert code == 0 and "step 10: 2 sites" in out
    assert any(line.split()[:3] == ["bn>relu", "64", str(last.dead)] for line in out.splitlines()), out


@pytest.mark.parametrize("make", ["state_dict", "empty-timeline", "safetensors", "hostile"])
def test_timeline_command_refuses_a_checkpoint_without_a_timeline(tmp_path: Path, make: str) -> None:
    from tests.fixtures_checkpoints import RunsCommand, safetensors_file, tiny_state_dict

    path = tmp_path / "model.pth"
    if make == "state_dict":
        torch.save(tiny_state_dict(), path)
    elif make == "empty-timeline":
        torch.save({"state_dict": tiny_state_dict(), "health_timeline": []}, path)
    elif make == "safetensors":
        path = safetensors_file(tmp_path)
    else:  # a pickle that would run a command: refused unloaded, nothing runs
        torch.save({"health_timeline": [RunsCommand(tmp_path / "marker")]}, path)
    code, _out, err = _invoke(["timeline", str(path), "--out", str(tmp_path / "fig.png")])
    lines = err.strip().splitlines()
    expected = (3, "refused") if make == "hostile" else (2, "without a health timeline")
    assert (code, len(lines)) == (expected[0], 1) and expected[1] in lines[0], err
    assert lines[0].startswith("deadneuron: error: ") and str(path) in lines[0]
    assert not (tmp_path / "fig.png").exists() and not (tmp_path / "marker").exists()
