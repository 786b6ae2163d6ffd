"""Renderings of a Report: golden Markdown and terminal text, the report diff, the HTML page.

Golden files live in tests/golden/. After an intended change of a rendering, rewrite them with

    DEADNEURON_UPDATE_GOLDEN=1 pytest tests/test_render.py

and review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

import pytest
from rich.console import Console

from deadneuron.render.compare import change, diff_reports, render_diff, render_diff_markdown
from deadneuron.render.html import render_html
from deadneuron.render.markdown import render_markdown
from deadneuron.render.terminal import render
from deadneuron.report import Report

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DEADNEURON_UPDATE_GOLDEN") == "1"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str) -> Report:
    return Report.from_json((GOLDEN / name).read_text())


@pytest.fixture(scope="module")
def report_a() -> Report:
    return load("report_a.json")


@pytest.fixture(scope="module")
def report_b() -> Report:
    return load("report_b.json")


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME (trailing spaces ignored); rewrite it under DEADNEURON_UPDATE_GOLDEN=1."""
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}: run with DEADNEURON_UPDATE_GOLDEN=1 to create it, then review it")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; if intended: DEADNEURON_UPDATE_GOLDEN=1"


def plain_console(width: int = 80) -> tuple[Console, io.StringIO]:
    """What a pipe gets: no terminal, so no escape codes at all."""
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=False, color_system=None, legacy_windows=False), buf


def terminal_text(report: Report, *, verbose: bool = False) -> str:
    console, buf = plain_console()
    render(report, console, verbose=verbose)
    return buf.getvalue()


# -- Markdown and terminal goldens -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["report_a", "report_b"])
def test_markdown_golden(name: str) -> None:
    assert_golden(f"{name}.md", render_markdown(load(f"{name}.json")))


@pytest.mark.parametrize("name", ["report_a", "report_b"])
def test_terminal_golden_at_80_columns(name: str) -> None:
    text = terminal_text(load(f"{name}.json"))
    assert "\x1b" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert_golden(f"{name}.terminal.txt", text)


def test_terminal_verbose_golden(report_a: Report) -> None:
    text = terminal_text(report_a, verbose=True)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert_golden("report_a.verbose.terminal.txt", text)
    assert "dead    encoder.bn_layers.2>relu: channels 0, 1, 4" in text
    assert "channels 0, 1, 4" not in terminal_text(report_a)


def test_terminal_verdict_panel_is_above_the_figures_and_the_site_table(report_a: Report) -> None:
    text = terminal_text(report_a)
    assert text.index("deadneuron audit: checkpoints/slot_attention.pth") < text.index("Activation sites")
    panel = text[: text.index("╰")]
    assert panel.splitlines()[1].startswith("│ verdict: slots collapsed; 5 dead channels at 2 sites")
    for words in ("[error] 5 dead channels in 2 encoder sites", "try: deadneuron patch --activation leaky",
                  "[warning] slots collapse: 1.6 of 7 active"):  # fmt: skip
        assert words in panel
    facts = text[text.index("╰") : text.index("Activation sites")]
    for words in ("sparsity 45.7% exact zeros; flat 54.6%", "dead     5 of 36 channels in 2 of 4 sites; dormant 1",
                  "slots    1.60 active", "accuracy 79.0% of valid pixels (most-common-colour baseline 70.0%)"):  # fmt: skip
        assert words in facts


def test_no_color_keeps_the_words_and_drops_colour(report_a: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    buf = io.StringIO()
    render(report_a, Console(file=buf, width=80, force_terminal=True, legacy_windows=False))
    codes = set(ANSI.findall(buf.getvalue()))
    assert not [c for c in codes if re.search(r"\[(.*;)?(3[0-7]|38|9[0-7])(;|m)", c)]  # no foreground colour
    assert ANSI.sub("", buf.getvalue()).splitlines()[:12] == terminal_text(report_a).splitlines()[:12]


def test_colours_mark_severity(report_a: Report) -> None:
    buf = io.StringIO()
    render(report_a, Console(file=buf, width=80, force_terminal=True, color_system="standard", legacy_windows=False))
    assert "\x1b[1;31mencoder.bn_layers.2>relu" in buf.getvalue()  # a site with dead channels: bold red
    assert "\x1b[33m[warning]" in buf.getvalue()


def test_wide_console_does_not_fold(report_a: Report) -> None:
    console, buf = plain_console(width=160)
    render(report_a, console)
    assert "decoder.broadcast.upsampling_block_with_a_long_name.3>activation_function" in buf.getvalue()


# -- compare -----------------------------------------------------------------------------------------
def test_diff_of_two_reports(report_a: Report, report_b: Report) -> None:
    diff = diff_reports(report_a, report_b)
    by_name = {s.name: s for s in diff.sites}
    assert by_name["encoder.bn_layers.0>relu"].new_dead == (3,)
    assert by_name["encoder.bn_layers.1>relu"].revived == (2, 5)
    assert by_name["encoder.bn_layers.2>relu"].presence == "only_a"
    assert by_name["encoder.bn_layers.3>relu"].presence == "only_b"
    assert (diff.new_dead, diff.revived) == (1, 2)
    assert diff.slots["mean_active"] == (1.6, 3.4)
    assert diff.metrics["valid_pixel_accuracy"] == (0.79, 0.86)
    assert diff_reports(report_a, report_a).new_dead == 0


def test_diff_does_not_match_channels_of_a_resized_site(report_a: Report) -> None:
    sites = list(report_a.sites.values())
    grown = load("report_b.json").sites["encoder.bn_layers.3>relu"]
    renamed = Report.build([*sites[:1], grown.__class__(**{**grown.__dict__, "name": sites[1].name})])
    row = next(s for s in diff_reports(report_a, renamed).sites if s.name == sites[1].name)
    assert row.reshaped and row.revived == ()


@pytest.mark.parametrize(
    ("pair", "kind", "text"),
    [((0.457, 0.0), "share", "45.7% -> 0.0% (-45.7 pp)"), ((3.0, 1.0), "count", "3 -> 1 (-2)"),
     ((1.6, 3.4), "value", "1.60 -> 3.40 (+1.80)"), ((None, 0.2), "share", "- -> 20.0%"),
     ((2.0, 2.0), "value", "2.00 -> 2.00")],
)  # fmt: skip
def test_change_text(pair: tuple[float | None, float | None], kind: Literal["share", "count", "value"], text: str) -> None:
    assert change(pair, kind=kind) == text


def test_compare_goldens(report_a: Report, report_b: Report) -> None:
    diff = diff_reports(report_a, report_b)
    assert_golden("compare_a_b.md", render_diff_markdown(diff))
    console, buf = plain_console()
    render_diff(diff, console)
    assert max(len(line) for line in buf.getvalue().splitlines()) <= 80
    assert_golden("compare_a_b.terminal.txt", buf.getvalue())


# -- HTML --------------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag in ("link", "script") or (a.get("src") or "").startswith(("http", "//")):
            self.external.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_and_embeds_its_images(report_a: Report) -> None:
    import base64

    png = PNG_MAGIC + b"\0" * 16
    page = _Page()
    page.feed(render_html(report_a, figures={"Per-site health": png, "Heatmap <1>": png}))
    page.close()
    assert page.tags[0] == "html" and "style" in page.tags and not page.external
    assert [i["alt"] for i in page.images] == ["Per-site health", "Heatmap <1>"]
    for image in page.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == png
    text = " ".join(page.text)
    assert "decoder.broadcast.upsampling_block_with_a_long_name.3>activation_function" in text
    assert "[error]" in text and "dead channels 0, 1, 4" in text
