"""Before a long run: every output path checked before any work, all outputs written together or none,
and the time estimate's arithmetic (a fake clock: no wall time is measured or asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.cli import app
from deadneuron.cli._outputs import Outputs
from deadneuron.errors import WriteError
from deadneuron.patch.estimate import MIN_STEPS, Estimator, duration

OWN = Path(__file__).resolve().parent / "own_cnn.py"
SUBJECT = ("--model", f"{OWN}:build", "--data", f"{OWN}:batches")


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_cnn_for_outputs", OWN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "in" / "own.pth"
    path.parent.mkdir()
    torch.save(module.build().state_dict(), path)
    return path


def patch(ckpt: Path, *extra: object) -> tuple[int, str, str]:
    return run("patch", ckpt, *SUBJECT, "--activation", "leaky", *extra)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (("--figure", "{tmp}"), 7, "--figure {tmp}: is a folder; give a file path"),
        (("--markdown", "{tmp}/in/own.pth"), 2, "is an input of this run"),
        (("--markdown", "{tmp}/old.md"), 2, "--markdown {tmp}/old.md: already exists; pass --force"),
        (("--figure", "{tmp}/missing/f.png"), 7, "folder {tmp}/missing does not exist"),
        (("--out", "{tmp}/x.pth", "--markdown", "{tmp}/x.pth"), 2, "--out and --markdown both name"),
    ],
    ids=["figure-is-a-folder", "markdown-is-the-input", "markdown-exists", "figure-folder-missing", "same-path-twice"],
)
def test_output_paths_are_refused_before_any_work(ckpt: Path, tmp_path: Path, extra: tuple[str, ...], code: int,
                                                   message: str) -> None:  # fmt: skip
    (tmp_path / "old.md").write_text("keep me")
    before = listing(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    for train in ((), ("--train", f"{OWN}:train", "--max-steps", "2")):
        result_code, _, stderr = patch(ckpt, *args, *train)
        assert result_code == code, stderr
        assert message.replace("{tmp}", str(tmp_path)) in stderr
        assert "plan:" not in stderr, "refused before the model was even loaded"
        assert listing(tmp_path) == before and (tmp_path / "old.md").read_text() == "keep me"


def test_force_overwrites_the_extras_and_every_output_is_written(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "old.md").write_text("old")
    out, fig = tmp_path / "p.pth", tmp_path / "f.png"
    code, _, stderr = patch(ckpt, "--out", out, "--markdown", tmp_path / "old.md", "--figure", fig, "--force")
    assert code == 0, stderr
    assert out.exists() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| all sites | dead channels |" in (tmp_path / "old.md").read_text()


def test_a_failing_write_removes_what_the_run_already_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deadneuron.checkpoint as checkpoint

    def disk_full(*args: object, **kwargs: object) -> None:
        raise WriteError("disk full")

    outputs = Outputs(force=False)
    outputs.checkpoint(tmp_path / "a.pth", {"x": torch.zeros(2)})
    outputs.text(tmp_path / "b.md", "table")
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full)
    with pytest.raises(WriteError, match="disk full"):
        outputs.write(lambda _: None)
    assert listing(tmp_path) == [], "the checkpoint written first is removed again"


def test_a_failing_figure_leaves_no_checkpoint(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deadneuron.render import training_plots

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot draw")

    monkeypatch.setattr(training_plots, "plot_before_after", broken)
    out = tmp_path / "p.pth"
    code, _, _ = patch(ckpt, "--out", out, "--figure", tmp_path / "f.png")
    assert code != 0 and not out.exists() and not (tmp_path / "f.png").exists()


def test_audit_report_folder_that_is_a_file_is_refused_before_the_audit(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.write_text("a file")
    code, stdout, stderr = run("audit", ckpt, *SUBJECT, "--out", target)
    assert code == 2 and "--out" in stderr and "is a file" in stderr and stdout == ""


def test_estimate_from_the_first_steps_then_from_the_first_run() -> None:
    now = [100.0]
    said: list[str] = []
    estimate = Estimator(runs=4, steps=600, say=said.append, clock=lambda: now[0])
    estimate.run_started(0)
    now[0] += 3.0  # start-up before the first step: not part of the rate
    estimate.steps_done(1)
    for step in range(2, MIN_STEPS + 1):
        now[0] += 0.5
        estimate.steps_done(step)
    assert said == [], "fewer than MIN_STEPS measured steps: no estimate yet"
    now[0] += 0.5
    estimate.steps_done(MIN_STEPS + 1)
    assert said == [f"estimate: about {duration(0.5 * 600 * 4)} of training for 4 run(s) x 600 steps (0.5 s/step "
                    f"over {MIN_STEPS} steps of the first run; audits come on top)"]  # fmt: skip
    estimate.steps_done(50)
    assert len(said) == 1, "said once"
    now[0] = 100.0 + 330.0
    estimate.run_finished(0)
    assert said[1] == "run 1 of 4 took 5.5 min (trained and audited): about 16.5 min left for the other 3"
    estimate.run_started(1)
    estimate.steps_done(7)
    estimate.run_finished(1)
    assert len(said) == 2


@pytest.mark.parametrize(("seconds", "text"), [(4.2, "4.2 s"), (42, "42 s"), (210, "3.5 min"), (4320, "72.0 min"),
                                              (7200, "2.0 h")])  # fmt: skip
def test_duration_text(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_report_and_compare_check_their_outputs_before_reading(ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "rep"
    code, _, stderr = run("audit", ckpt, *SUBJECT, "--out", folder)
    assert code == 0, stderr
    assert (folder / "report.json").exists()
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, stderr = run("report", folder, "--format", "json", "--out", a_file)
    assert code == 2 and "is a file; give a folder" in stderr
    code, _, stderr = run("compare", folder, folder, "--out", tmp_path)
    assert code == 7 and "is a folder; give a file path" in stderr
    code, _, stderr = run("compare", folder, folder, "--out", folder / "report.json")
    assert code == 2 and "is an input of this run" in stderr
    assert a_file.read_text() == "x"


def test_estimate_of_runs_spread_over_workers() -> None:
    said: list[str] = []
    estimate = Estimator(runs=6, steps=600, say=said.append)
    estimate.spread_run_finished(330.0, workers=2)  # 2 in flight, then 4 more: 2 rounds of 2
    estimate.spread_run_finished(331.0, workers=2)
    assert said == ["the first of 6 runs took 5.5 min (trained and audited, 2 at a time): about 11.0 min left for "
                    "the other 5"]  # fmt: skip
    quiet: list[str] = []
    Estimator(runs=2, steps=600, say=quiet.append).spread_run_finished(330.0, workers=2)
    assert quiet == [], "every run already started: nothing is left to estimate"
