"""Loose ends: --config errors and their exit code, timelines that do not start at step 0, one exit code
for an output that is a folder, evidence counts that cannot read as channel ids, a --sites glob that
matches no site."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.report import Report
from deadneuron.rules import RuleContext, evaluate
from deadneuron.rules.finding import Finding
from deadneuron.rules.model import Evidence, RuleSet, Severity
from deadneuron.rules.timeline_rules import TIMELINE_RULES, monitor_context
from tests.test_patch_own import OWN, OWN_CNN

ROOT = Path(__file__).resolve().parent.parent
SMALL_CNN = ROOT / "examples" / "small_cnn.py"
AT_INIT = re.compile(r"\bat init\b")
EXIT_TABLE = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def documented(code: int) -> str:
    """The meaning docs/cli.md gives exit code ``code``."""
    match = re.search(rf"^\| {code} \| (.+) \|$", EXIT_TABLE, flags=re.M)
    assert match, f"docs/cli.md documents no exit code {code}"
    return match.group(1)


# -- 1. --config: a file that cannot be read is unreadable input (exit 4), named with its option -----------
def _folder(tmp: Path) -> Path:
    (tmp / "rules.toml").mkdir()
    return tmp / "rules.toml"


def _bad_toml(tmp: Path) -> Path:
    (tmp / "rules.toml").write_text("[rules.dead-relu\nmin_channels = 3\n")
    return tmp / "rules.toml"


def _binary(tmp: Path) -> Path:
    (tmp / "rules.toml").write_bytes(b"\xff\xfe\x00[rules]\x80\x81")
    return tmp / "rules.toml"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(lambda tmp: tmp / "missing.toml", "no such file", id="missing"),
        pytest.param(_folder, "is a folder", id="folder"),
        pytest.param(_bad_toml, "not valid TOML", id="not-toml"),
        pytest.param(_binary, "not valid TOML", id="not-text"),
    ],
)
@pytest.mark.parametrize("command", ["audit", "rules"])
def test_a_config_file_that_cannot_be_read_exits_4_naming_the_option(tmp_path: Path, make: Any, says: str,
                                                                      command: str) -> None:  # fmt: skip
    config = make(tmp_path)
    args = ("audit", tmp_path / "never-opened.pth") if command == "audit" else ("rules",)
    code, _, stderr = run(*args, "--config", config)
    line = one_error_line(stderr)
    assert code == 4, stderr
    assert f"--config {config}" in line and says in line
    assert "--config" in documented(4)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_config_file_exits_4(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text("[rules.dead-relu]\nmin_channels = 3\n")
    config.chmod(0)
    code, _, stderr = run("rules", "--config", config)
    assert code == 4 and f"--config {config}: permission denied" in one_error_line(stderr)


def test_a_config_file_this_user_may_not_read_is_unreadable_input(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The same branch as above, for a test run as root (whom file modes do not stop)."""
    from deadneuron.errors import UnreadableInputError
    from deadneuron.settings import read_config_file

    config = tmp_path / "rules.toml"
    config.write_text("[rules.dead-relu]\nmin_channels = 3\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(UnreadableInputError, match=f"--config {re.escape(str(config))}: permission denied"):
        read_config_file(config)


def test_a_config_file_with_a_bad_value_stays_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text("[rules.dead-relu]\nmin_channels = -3\n")
    code, _, stderr = run("rules", "--config", config)
    assert code == 2 and f"--config {config}" in one_error_line(stderr)


# -- 2. a timeline that starts after step 0 (a resumed run) is not "at init" ------------------------------
def _entry(first: int, step: int, dead: list[int]) -> dict[str, Any]:
    return {"step": step, "first_step": first, "sites": {"a": {"channels": 8, "dead_channels": dead}}}


def _timeline_findings(start: int) -> dict[str, Finding]:
    entries = [_entry(start, start + 10, [1, 2]), _entry(start + 10, start + 20, [1, 2])]
    context = monitor_context(entries, learning_rate=1e-2, optimizer="adam", steps=start + 20)
    return {f.rule: f for f in evaluate(Report.build([]), context, rules=RuleSet(TIMELINE_RULES))}


def test_dead_from_start_of_a_resumed_timeline_does_not_blame_initialisation() -> None:
    resumed = _timeline_findings(500)["dead-from-start"]
    assert "(over steps 500-509)" in resumed.message
    assert "starts at step 500" in resumed.message and "may have died in the steps before it" in resumed.message
    assert "Training did not kill them" not in resumed.message
    assert [(e.metric, e.site, e.observed) for e in resumed.evidence][:1] == [("dead_from_start_channels", "a", 2)]
    from_zero = _timeline_findings(0)["dead-from-start"]
    assert "Training did not kill them" in from_zero.message and "starts at step" not in from_zero.message


def _planted(*layers: nn.Module) -> nn.Sequential:
    """Linear(4, 8) + ReLU with channels 1 and 2 dead on every input in [0, 1), the others alive."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), *layers)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(0.1)
        model[0].bias[[1, 2]] = -100.0
    return model


def _dead_relu_note(first_window_start: int) -> str:
    model = _planted()
    report = deadneuron.audit(model, [torch.rand(16, 4)], progress=False)
    (site,) = report.sites
    assert list(report.sites[site].dead_channels) == [1, 2]
    s = first_window_start
    timeline = ({"step": s + 10, "first_step": s, "sites": {site: {"dead_channels": [1, 2]}}},
                {"step": s + 20, "first_step": s + 10, "sites": {site: {"dead_channels": [1, 2]}}})  # fmt: skip
    found = {f.rule: f for f in evaluate(report, RuleContext(timeline=timeline))}
    return found["dead-relu"].message


def test_the_dead_relu_history_note_names_the_start_of_a_resumed_timeline() -> None:
    resumed = _dead_relu_note(300)
    assert "2 dead since the first window measured (step 300)" in resumed and not AT_INIT.search(resumed)
    assert "2 dead at init" in _dead_relu_note(0)


def test_a_monitor_started_at_a_later_step_words_its_first_window_as_such() -> None:
    torch.manual_seed(0)
    model = _planted(nn.Linear(8, 1))  # a dead ReLU channel gets no gradient: nothing revives channels 1, 2
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with deadneuron.Monitor(model, every=2, optimizer=opt, start_step=40) as mon:
        for _ in range(4):
            opt.zero_grad()
            model(torch.rand(16, 4)).pow(2).mean().backward()
            opt.step()
            mon.step()
    assert [(s.first_step, s.step) for s in mon.snapshots] == [(40, 42), (42, 44)]
    found = {f.rule: f for f in mon.findings()}
    assert dict(found["dead-from-start"].channels) == {"1": (1, 2)}
    texts = " ".join(f.message for f in found.values())
    assert "starts at step 40" in found["dead-from-start"].message
    assert "dead since the first window measured (step 40)" in found["dead-relu"].message
    assert not AT_INIT.search(texts) and "Training did not kill them" not in texts


# -- 3. an output that is a folder: exit 7, as docs/cli.md says, for train, patch and compare --------------
@pytest.fixture
def own_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "own.pth"
    path.parent.mkdir()
    torch.save(OWN_CNN.build().state_dict(), path)
    return path


def test_an_output_that_is_a_folder_exits_7_in_every_command(own_ckpt: Path, tmp_path: Path) -> None:
    assert "output is a folder" in documented(7)
    folder = tmp_path / "out.pth"
    folder.mkdir()
    subject = ("--model", f"{OWN}:build", "--data", f"{OWN}:batches", "--activation", "leaky")
    for option in ("--out", "--markdown", "--figure"):
        code, _, stderr = run("patch", own_ckpt, *subject, option, folder, "--force")
        assert code == 7, stderr
        assert f"{option} {folder}: is a folder" in one_error_line(stderr)
    code, _, stderr = run("train", "--out", folder, "--max-steps", 1, "--no-progress")
    assert code == 7 and "is a folder" in one_error_line(stderr)
    report = tmp_path / "rep"
    assert run("audit", own_ckpt, *subject[:4], "--out", report, "--no-progress")[0] == 0
    code, _, stderr = run("compare", report, report, "--out", folder)
    assert code == 7 and "is a folder" in one_error_line(stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.pth", "rep"] and not any(folder.iterdir())


def test_an_existing_output_file_without_force_is_documented_as_exit_2() -> None:
    assert "an existing output without `--force`" in documented(2)


# -- 4. evidence counts read as counts, never as channel ids ------------------------------------------------
def _group_lines(*evidence: Evidence) -> list[tuple[str, str]]:
    from deadneuron.render.findings_view import group_findings

    finding = Finding(rule="r", severity=Severity.WARNING, title="t", message="m", sites=("x",), evidence=evidence)
    (group,) = group_findings([finding])
    return [(line.site, line.text) for line in group.lines]


def test_a_channel_count_reads_as_a_count_of_the_site_s_channels() -> None:
    lines = _group_lines(Evidence("dead_channels", 2, 1, ">=", "x"), Evidence("dead_fraction", 2 / 64, 0.05, ">=", "x"))
    assert lines == [("x", "2 of 64 channels dead (3.1%)")]
    lines = _group_lines(Evidence("died_channels", 1, 1, ">=", "x"), Evidence("died_channels_fraction", 1 / 12, 0, ">=", "x"))
    assert lines == [("x", "1 of 12 channels died (8.3%)")]


def test_bare_counts_come_before_their_words() -> None:
    lines = _group_lines(Evidence("sparsity", 0.552, 0.5, ">=", "x"), Evidence("dead_or_dormant_channels", 0, 0, "<=", "x"),
                         Evidence("nonfinite", 1, 1, ">=", "y"), Evidence("guessed_axis_sites", 3, 1, ">="))  # fmt: skip
    assert lines == [("", "3 sites whose channel axis was guessed: marked ? in the site table"),
                     ("x", "sparsity 55.2%, 0 dead or dormant channels"),
                     ("y", "1 non-finite activation")]  # fmt: skip


def test_the_json_evidence_keeps_its_metric_names() -> None:
    evidence = (Evidence("dead_channels", 2, 1, ">=", "x"), Evidence("dead_fraction", 2 / 64, 0.05, ">=", "x"))
    finding = Finding(rule="r", severity=Severity.WARNING, title="t", message="m", sites=("x",), evidence=evidence)
    assert [e["metric"] for e in finding.to_dict()["evidence"]] == ["dead_channels", "dead_fraction"]


# -- 5. a --sites glob that matches no site is a usage error ------------------------------------------------
def _gate(*args: str) -> tuple[int, str, str]:
    return run("audit", ROOT / "examples" / "small_cnn.pth", "--model", f"{SMALL_CNN}:build", "--data",
               f"{SMALL_CNN}:batches", "--batches", "2", "--no-progress", "--max-dead", "0", *args)  # fmt: skip


def test_a_gate_on_a_glob_that_matches_no_site_is_a_usage_error() -> None:
    code, _, stderr = _gate("--sites", "encoder.*")
    line = one_error_line(stderr)
    assert code == 2, stderr
    assert "--sites 'encoder.*' matches no site" in line and "(sites: 2, 5)" in line
    code, _, stderr = _gate("--sites", "5", "--sites", "nope*")  # one glob matches: the other still guards nothing
    assert code == 2 and "--sites 'nope*' matches no site" in one_error_line(stderr)
    assert "--sites" in documented(2) and "matching no site" in documented(2)
