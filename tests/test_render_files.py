"""Report folders (deadneuron.render.files) and the `report`, `compare` and `audit --out` commands."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import pytest

from deadneuron.render.files import parse_formats, write_report
from deadneuron.report import Report
from tests.test_render_figures import TinyAdapter, TinySlotModel, timeline

matplotlib.use("Agg")

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).parent.parent
SMALL_CNN = ROOT / "examples" / "small_cnn.py"
REPORT_FIGURES = ["active_slots", "channel_heatmap", "channel_moments", "site_health"]


@pytest.fixture(scope="module")
def report_a() -> Report:
    return Report.from_json((GOLDEN / "report_a.json").read_text())


@pytest.fixture(scope="module")
def folder(report_a: Report, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full report folder: with model, adapter and a checkpoint holding a timeline."""
    out = tmp_path_factory.mktemp("reports") / "run"
    checkpoint = {
        "config": {},
        "health_timeline": timeline(),
        "history": [{"epoch": 1, "train_accuracy": 0.5}],
    }
    write_report(report_a, out, model=TinySlotModel(), adapter=TinyAdapter(), checkpoint=checkpoint)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from deadneuron.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def images_of(html: str) -> list[str]:
    parser = _Images()
    parser.feed(html)
    return parser.sources


def test_report_folder(folder: Path, report_a: Report) -> None:
    names = sorted(p.name for p in folder.iterdir())
    pngs = sorted([*REPORT_FIGURES, "health_timeline", "slot_samples"])
    assert names == sorted(
        [*(f"{n}.png" for n in pngs), "report.html", "report.json", "report.md", "timeline.json"]
    )
    assert Report.from_json((folder / "report.json").read_text()).to_dict() == report_a.to_dict()
    markdown = (folder / "report.md").read_text()
    for name in pngs:
        assert f"]({name}.png)" in markdown
    sources = images_of((folder / "report.html").read_text())
    assert len(sources) == len(pngs) and all(
        s.startswith("data:image/png;base64,iVBORw0KGgo") for s in sources
    )
    assert json.loads((folder / "timeline.json").read_text())["health_timeline"][1]["epoch"] == 10


def test_a_figure_that_cannot_be_drawn_is_skipped_with_a_warning(report_a: Report, tmp_path: Path) -> None:
    class NoGrids(TinyAdapter):
        def batches(self, split: str, config: object) -> list[object]:
            return [super().batches(split, config)[0]._replace(target=None)]

    warnings: list[str] = []
    written = write_report(report_a, tmp_path, model=TinySlotModel(), adapter=NoGrids(), formats=("png",),
                           warn=warnings.append)  # fmt: skip
    assert sorted(p.stem for p in written) == REPORT_FIGURES
    assert warnings and warnings[0].startswith("slot samples not drawn")


@pytest.mark.parametrize(
    ("text", "formats"),
    [
        ("md", ("md",)),
        ("png,md", ("md", "png")),
        ("all", ("json", "md", "html", "png")),
        (["html"], ("html",)),
    ],
)
def test_parse_formats(text: str, formats: tuple[str, ...]) -> None:
    assert parse_formats(text) == formats


def test_parse_formats_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="pdf"):
        parse_formats("md,pdf")


# -- deadneuron report -------------------------------------------------------------------------------
def test_report_renders_a_saved_report_again(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "report", str(folder / "report.json"), "--format", "html,png", "--out", str(tmp_path)
    )
    assert code == 0
    # the timeline kept beside the report is drawn again; slot samples need the model
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        f"{n}.png" for n in [*REPORT_FIGURES, "health_timeline"]
    )
    assert len(images_of((tmp_path / "report.html").read_text())) == 5
    assert str(tmp_path / "report.html") in out


def test_report_markdown_and_terminal_on_stdout(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", str(folder), "--format", "md")
    assert code == 0 and out == (GOLDEN / "report_a.md").read_text()
    code, out, _ = run(capsys, "report", str(folder / "report.json"))
    assert code == 0 and "Activation sites" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--format", "html"], 2, "pass --out DIR"),
        (["--format", "pdf"], 2, "formats are json, md, html, png or all, got pdf"),
    ],
)
def test_report_usage_errors(folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                             message: str) -> None:  # fmt: skip
    got, _, err = run(capsys, "report", str(folder / "report.json"), *argv)
    assert got == code and message in err


def test_report_unreadable_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", str(tmp_path / "nope.json"))
    assert code == 4 and "no such report file" in err
    (tmp_path / "bad.json").write_text('{"schema": "something else"}')
    code, _, err = run(capsys, "report", str(tmp_path / "bad.json"))
    assert code == 4 and "not a readable deadneuron report (not a deadneuron report" in err
    (tmp_path / "trunc.json").write_text('{"schema": "deadneuron.report", "schema_version": 1, "sites": [')
    code, _, err = run(capsys, "report", str(tmp_path / "trunc.json"))
    assert code == 4 and err.count("\n") == 1


# -- deadneuron compare ------------------------------------------------------------------------------
def test_compare_two_reports_that_differ(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b = str(GOLDEN / "report_a.json"), str(GOLDEN / "report_b.json")
    code, out, _ = run(capsys, "compare", a, b)
    assert code == 0
    assert "dead channels                 141 -> 28 (-113); 11 newly dead, 124 revived" in out
    assert "new dead decoder.layers.3: channels 15, 18, 27, 35" in out
    assert "revived  encoder.bn_layers.1>relu: channels 0, 2, 6, 10, 14, 21, 22, 38, 39, 47," in out
    code, out, _ = run(capsys, "compare", a, b, "--format", "md", "--out", str(tmp_path / "diff.md"))
    assert code == 0 and out == (GOLDEN / "compare_a_b.md").read_text() == (tmp_path / "diff.md").read_text()


def test_compare_errors(capsys: pytest.CaptureFixture[str]) -> None:
    a = str(GOLDEN / "report_a.json")
    assert run(capsys, "compare", a, a, "--format", "xml")[0] == 2
    code, _, err = run(capsys, "compare", a, str(GOLDEN / "missing.json"))
    assert code == 4 and "missing.json: no such report file" in err


# -- deadneuron audit --out --------------------------------------------------------------------------
def test_audit_writes_the_report_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "small"
    code, _, _ = run(capsys, "audit", str(ROOT / "examples" / "small_cnn.pth"), "--model", f"{SMALL_CNN}:build",
                     "--data", f"{SMALL_CNN}:batches", "--batches", "2", "--no-progress", "--out", str(out))  # fmt: skip
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["activation_histograms.png", "channel_heatmap.png", "channel_moments.png", "report.html", "report.json", "report.md",
                     "site_health.png"]  # fmt: skip
    saved = Report.from_json((out / "report.json").read_text())
    assert saved.sites["5"].dead_channels == (3, 7)
