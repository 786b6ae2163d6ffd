"""The terminal report leads with the answer: the real audit of the bundled checkpoint, as a golden file.

`deadneuron audit checkpoints/slot_attention.pth --batches 8` at 80 columns is compared with
tests/golden/demo_audit.terminal.txt; after an intended change of the rendering (or of the bundled
checkpoint) rewrite it with

    DEADNEURON_UPDATE_GOLDEN=1 pytest tests/test_render_demo.py

and review the diff like code. The grouping itself is checked on hand-built findings.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from deadneuron.cli import app
from deadneuron.render.findings_view import group_findings, number_text, verdict
from deadneuron.render.terminal import render
from deadneuron.report import Report
from deadneuron.rules.finding import Finding
from tests.test_render import assert_golden

ROOT = Path(__file__).resolve().parent.parent
DEMO = "checkpoints/slot_attention.pth"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _audit(monkeypatch: pytest.MonkeyPatch, *extra: str) -> str:
    monkeypatch.chdir(ROOT)  # the report names the checkpoint as given: a relative path, the same everywhere
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("NO_COLOR", raising=False)
    result = CliRunner().invoke(app, ["audit", DEMO, "--batches", "8", "--no-progress", *extra])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def demo() -> dict[str, str]:
    """The default and --verbose tables and the JSON report of one short audit of the bundled checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        return {
            "table": _audit(mp),
            "verbose": _audit(mp, "--verbose"),
            "json": _audit(mp, "--format", "json"),
        }


def test_demo_audit_golden_at_80_columns(demo: dict[str, str]) -> None:
    text = demo["table"]
    lines = text.splitlines()
    assert not ANSI.search(text)
    assert max(len(line) for line in lines) <= 80
    assert len(lines) < 60, f"the demo report is {len(lines)} lines"
    assert_golden("demo_audit.terminal.txt", text)


def test_demo_report_leads_with_the_verdict_and_the_task_findings(demo: dict[str, str]) -> None:
    data = json.loads(demo["json"])
    text = demo["table"]
    dead_sites = sum(1 for s in data["sites"] if s["dead_channels"])
    dead = sum(len(s["dead_channels"]) for s in data["sites"])
    assert text.splitlines()[1].startswith(
        f"│ verdict: task below baseline; slots collapsed; {dead} dead channels at {dead_sites} sites"
    )
    panel = text[: text.index("╰")]
    first = [
        panel.index(t) for t in ("Task accuracy not above", "Slot collapse", "Dead channels at a ReLU site")
    ]
    encoder = re.search(r"encoder\.bn_layers\.1>relu  \d+ of 64 channels dead", panel)
    first.append(encoder.start() if encoder else -1)
    assert first == sorted(first)  # task-level findings before the per-site warning, which names the encoder
    assert panel.count("[warning]") + panel.count("[info]") + panel.count("[error]") == 3


def test_one_line_per_site_and_each_command_once(demo: dict[str, str]) -> None:
    """In full (--verbose): one line per site and every command once; by default each command at most once."""
    data = json.loads(demo["json"])
    text = demo["verbose"]
    dead_relu = [f for f in data["findings"] if f["rule"] == "dead-relu"]
    assert len(dead_relu) > 1
    assert demo["table"].count("Dead channels at a ReLU site") == 1  # one group, not a paragraph per site
    lines = [(site, len(f["channels"][site])) for f in dead_relu for site in f["sites"]]
    shown = [site for site, n in lines
             if re.search(rf"^│\s+{re.escape(site)}\s+{n} of \d+ channels dead \(", demo["table"], re.M)]
    assert shown == [site for site, _ in lines[:3]]  # the first three sites, one line each (the table has all)
    assert f"and {len(lines) - 3} more sites (--verbose)" in demo["table"]
    flat = " ".join(text.replace("│", " ").split())  # commands wrap at 80 columns, inside the panel too
    commands = {c for f in data["findings"] for c in f["commands"]}
    assert commands
    plain = " ".join(demo["table"].replace("│", " ").split())
    for command in commands:
        pattern = rf"try: {re.escape(command)}(?= try:| and \d+ more| \d+ more| \[| More| --verbose:| Findings in full|$)"
        assert len(re.findall(pattern, flat)) == 1, command
        assert len(re.findall(pattern, plain)) <= 1, command


def test_channel_ids_and_full_text_only_with_verbose(demo: dict[str, str]) -> None:
    data = json.loads(demo["json"])
    health = next(s for s in data["sites"] if s["dead_channels"])
    site = health["name"]
    ids = ", ".join(map(str, health["dead_channels"][:5]))
    plain, verbose = (" ".join(demo[k].split()) for k in ("table", "verbose"))
    assert f"dead {site}: channels {ids}" in verbose and f"channels {ids}" not in plain
    message = " ".join(data["findings"][0]["message"].split())
    assert message[:120] in verbose and message[:120] not in plain
    assert "--verbose:" in plain
    assert demo["verbose"].splitlines()[:2] == demo["table"].splitlines()[:2]  # the same verdict first


# -- grouping, ranking and the verdict on hand-built findings ------------------------------------------
def _finding(rule: str, severity: str = "warning", *, sites: tuple[str, ...] = (), commands: tuple[str, ...] = (),
             evidence: tuple[dict[str, object], ...] = ()) -> Finding:  # fmt: skip
    """A finding as a report's JSON holds it, read back."""
    return Finding.from_dict({"rule": rule, "severity": severity, "title": f"title of {rule}",
                              "message": f"message of {rule} {sites}", "sites": list(sites), "channels": {},
                              "evidence": list(evidence), "commands": list(commands)})  # fmt: skip


def _site_evidence(site: str, n: int) -> dict[str, object]:
    return {"metric": "dead_channels", "site": site, "observed": n, "threshold": 1, "comparison": ">="}


FINDINGS = (
    _finding("dead-relu", sites=("a",), commands=("fix a", "fix b"), evidence=(_site_evidence("a", 3),)),
    _finding("dead-relu", sites=("b", "c"), commands=("fix a", "fix b"),
             evidence=(_site_evidence("b", 4), _site_evidence("c", 5))),
    _finding("sparse-healthy", "info", sites=("d",)),
    _finding("below-baseline", evidence=({"metric": "valid_pixel_accuracy", "site": None, "observed": 0.5,
                                          "threshold": 0.65, "comparison": "<="},)),
    _finding("nonfinite", "error", sites=("e",)),
)  # fmt: skip


def test_groups_rank_severity_then_task_level_findings() -> None:
    groups = group_findings(FINDINGS)
    assert [g.rule for g in groups] == ["nonfinite", "below-baseline", "dead-relu", "sparse-healthy"]
    dead = groups[2]
    assert [(line.site, line.text) for line in dead.lines] == [("a", "3 dead channels"), ("b", "4 dead channels"),
                                                                ("c", "5 dead channels")]  # fmt: skip
    assert dead.commands == ("fix a", "fix b") and dead.headline == "title of dead-relu (3 sites)"
    assert [line.text for line in groups[1].lines] == ["valid pixel accuracy 50.0% <= 65.0%"]


def test_groups_read_findings_built_in_python() -> None:
    from deadneuron.rules.model import Evidence, Severity

    finding = Finding(rule="dead-relu", severity=Severity.WARNING, title="t", message="m", sites=("x",),
                      evidence=(Evidence("dead_channels", 2, 1, ">=", "x"),), commands=("c",))  # fmt: skip
    (group,) = group_findings([finding])
    assert (group.severity, group.lines[0].text, group.commands) == (Severity.WARNING, "2 dead channels", ("c",))


@pytest.mark.parametrize(("metric", "value", "text"), [("dead_fraction", 0.609375, "60.9%"), ("dead_channels", 39, "39"),
                         ("mask_entropy", 0.99988, "1.00"), ("learning_rate", 0.003, "0.003"), ("ratio", 250.5, "250")])  # fmt: skip
def test_number_text(metric: str, value: float, text: str) -> None:
    assert number_text(metric, value) == text


def _report(*, dead: dict[str, tuple[int, ...]], findings: tuple[Finding, ...] = ()) -> Report:
    """Sites cut from the golden report_a, with the dead channels given and no dormant ones."""
    from dataclasses import replace

    template = next(iter(Report.from_json((ROOT / "tests/golden/report_a.json").read_text()).sites.values()))
    sites = [replace(template, name=n, dead_channels=ids, dormant_channels=()) for n, ids in dead.items()]
    return Report.build(sites).with_findings(findings)


def test_verdict_words() -> None:
    healthy = _report(dead={"a": (), "b": ()})
    assert verdict(healthy, []) == "healthy: no dead channels at 2 sites"
    sick = _report(dead={"a": (1, 2), "b": ()}, findings=FINDINGS[3:4])
    assert verdict(sick, group_findings(sick.findings)) == "task below baseline; 2 dead channels at 1 site"
    warned = _report(dead={"a": ()}, findings=(_finding("lr-dying"),))
    assert verdict(warned, group_findings(warned.findings)) == "no dead channels at 1 site, but 1 warning"


def test_render_of_a_healthy_report_is_short() -> None:
    buf = io.StringIO()
    render(_report(dead={"a": (), "b": ()}), Console(file=buf, width=80, color_system=None))
    text = buf.getvalue()
    assert "verdict: healthy: no dead channels at 2 sites" in text and "--verbose" not in text
    assert len(text.splitlines()) < 15


def test_report_command_takes_verbose_too(tmp_path: Path) -> None:
    saved = tmp_path / "report.json"
    saved.write_text((ROOT / "tests/golden/report_a.json").read_text())
    plain = CliRunner().invoke(app, ["report", str(saved)], env={"COLUMNS": "80"})
    verbose = CliRunner().invoke(app, ["report", str(saved), "--verbose"], env={"COLUMNS": "80"})
    assert plain.exit_code == 0 and verbose.exit_code == 0, plain.stderr + verbose.stderr
    ids = "dormant encoder.bn_layers.3>relu: channels 19, 37, 48, 52, 53"
    assert ids in verbose.stdout and "channels 19, 37, 48, 52, 53" not in plain.stdout
