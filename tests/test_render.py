"""Renderings of a Report: golden Markdown and terminal text, the report diff, the HTML page.

Golden files live in tests/golden/. After an intended change of a rendering, rewrite them with

    DEADNEURON_UPDATE_GOLDEN=1 pytest tests/test_render.py

and review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

import pytest
import torch
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
        pytest.fail(
            f"no golden file {path}: run with DEADNEURON_UPDATE_GOLDEN=1 to create it, then review it"
        )
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} changed; if intended: DEADNEURON_UPDATE_GOLDEN=1"
    )


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
    assert "dead    encoder.bn_layers.1>relu: channels 0, 2, 6, 10, 14, 21, 22, 38, 39, 47," in text
    assert "dormant encoder.bn_layers.3>relu: channels 19, 37, 48, 52, 53" in text
    brief = terminal_text(report_a)
    assert "channels 0, 2, 6, 10" not in brief and "channels 19, 37, 48, 52, 53" not in brief


def test_terminal_verdict_panel_is_above_the_figures_and_the_site_table(report_a: Report) -> None:
    text = terminal_text(report_a)
    assert text.index("deadneuron audit: checkpoints/slot_attention.pth") < text.index("Activation sites")
    panel = text[: text.index("╰")]
    assert panel.splitlines()[1].startswith(
        "│ verdict: 141 dead channels at 10 sites"
    )
    for words in ("[warning] Dead channels at a ReLU site (10 sites)",
                  "encoder.bn_layers.3>relu  15 of 64 channels dead (23.4%)",
                  "and 7 more sites (--verbose)",
                  "[warning] Dead channels in a conv stack without normalisation (4 sites)",
                  "[info] Sparse but healthy"):  # fmt: skip
        assert words in panel
    facts = text[text.index("╰") : text.index("Activation sites")]
    for words in ("sparsity 61.4% exact zeros; flat 61.4%", "dead     141 of 896 channels in 10 of 11 sites; dormant 31",
                  "slots    1.27 active", "accuracy 70.8% of valid pixels (most-common-colour baseline 68.9%)"):  # fmt: skip
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
    render(
        report_a,
        Console(file=buf, width=80, force_terminal=True, color_system="standard", legacy_windows=False),
    )
    assert "\x1b[1;31mencoder.bn_layers.2>relu" in buf.getvalue()  # a site with dead channels: bold red
    assert "\x1b[33m[warning]" in buf.getvalue()


LONG_NAME = "decoder.broadcast.upsampling_block_with_a_long_name.3>activation_function"


def with_long_name(report: Report) -> Report:
    """Report A's sites, the last one renamed to a name too long for an 80-column site table."""
    *sites, last = report.sites.values()
    return Report.build([*sites, last.__class__(**{**last.__dict__, "name": LONG_NAME})])


def test_wide_console_does_not_fold(report_a: Report) -> None:
    long = with_long_name(report_a)
    assert LONG_NAME not in terminal_text(long)  # folded at 80 columns
    console, buf = plain_console(width=160)
    render(long, console)
    assert LONG_NAME in buf.getvalue()


# -- compare -----------------------------------------------------------------------------------------
def test_diff_of_two_reports(report_a: Report, report_b: Report) -> None:
    diff = diff_reports(report_a, report_b)
    by_name = {s.name: s for s in diff.sites}
    assert list(by_name) == list(report_a.sites) and {s.presence for s in diff.sites} == {"both"}
    assert (by_name["encoder.bn_layers.0>relu"].new_dead, by_name["encoder.bn_layers.0>relu"].revived) == (
        (),
        (),
    )
    assert by_name["encoder.mlp.1"].revived == (30, 31, 35, 38, 39, 54, 60)
    assert by_name["decoder.layers.3"].new_dead == (15, 18, 27, 35)
    assert by_name["decoder.layers.5"].new_dead == (6, 11, 15, 27, 38, 43, 53)
    # every site against the set difference of the stored dead channel ids
    raw_a, raw_b = ({s["name"]: set(s["dead_channels"]) for s in json.loads((GOLDEN / f).read_text())["sites"]}
                    for f in ("report_a.json", "report_b.json"))  # fmt: skip
    for name, row in by_name.items():
        assert row.new_dead == tuple(sorted(raw_b[name] - raw_a[name]))
        assert row.revived == tuple(sorted(raw_a[name] - raw_b[name]))
    assert (diff.new_dead, diff.revived) == (
        sum(len(raw_b[n] - raw_a[n]) for n in raw_a), sum(len(raw_a[n] - raw_b[n]) for n in raw_a)
    ) == (11, 124)
    stored = [json.loads((GOLDEN / f).read_text()) for f in ("report_a.json", "report_b.json")]
    assert diff.slots["mean_active"] == tuple(r["slots"]["mean_active"] for r in stored)
    assert diff.metrics["valid_pixel_accuracy"] == tuple(r["metrics"]["valid_pixel_accuracy"] for r in stored)
    assert diff_reports(report_a, report_a).new_dead == 0


def test_diff_marks_sites_in_one_report_only(report_a: Report, report_b: Report) -> None:
    without_a = Report.build(s for s in report_a.sites.values() if s.name != "encoder.bn_layers.3>relu")
    without_b = Report.build(s for s in report_b.sites.values() if s.name != "encoder.bn_layers.2>relu")
    by_name = {s.name: s for s in diff_reports(without_a, without_b).sites}
    assert by_name["encoder.bn_layers.2>relu"].presence == "only_a"
    assert by_name["encoder.bn_layers.3>relu"].presence == "only_b"
    assert by_name["encoder.bn_layers.1>relu"].presence == "both"


def test_diff_does_not_match_channels_of_a_resized_site(report_a: Report) -> None:
    sites = list(report_a.sites.values())
    grown = load("report_b.json").sites["slot_attention.mlp.0>relu#0"]  # 128 channels where A's site has 64
    renamed = Report.build([*sites[:1], grown.__class__(**{**grown.__dict__, "name": sites[1].name})])
    row = next(s for s in diff_reports(report_a, renamed).sites if s.name == sites[1].name)
    assert row.reshaped and row.revived == ()


class _SharedMlp(torch.nn.Module):
    """One (Linear, activation, Linear) applied twice: its two sites are named after the activation's kind
    (``mlp.0>relu#0``, ``mlp.0>relu#1``), so a ReLU -> LeakyReLU swap renames both."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), act, torch.nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp(x))


def test_diff_compares_a_site_that_a_swap_renamed_with_itself() -> None:
    """A before (ReLU, channels 0 and 1 killed) and after (LeakyReLU, those channels revived) of the same
    model: each renamed site is one row, and its newly dead and revived channels are the set differences of
    the channels whose pre-activation (computed here by hand) is <= 0 (ReLU) or < 0 (LeakyReLU) everywhere."""
    import deadneuron

    torch.manual_seed(0)
    relu, leaky = _SharedMlp(torch.nn.ReLU()), _SharedMlp(torch.nn.LeakyReLU(0.01))
    with torch.no_grad():
        relu.mlp[0].bias[:2] = -50.0
    leaky.load_state_dict(relu.state_dict())
    with torch.no_grad():
        leaky.mlp[0].bias[:2] = 0.0
    xs = torch.randn(24, 4)
    a, b = (deadneuron.audit(m, [xs[:12], xs[12:]], rules=False) for m in (relu, leaky))
    assert list(b.sites) == ["mlp.0>leaky_relu#0", "mlp.0>leaky_relu#1"]  # the names did change

    def dead(model: _SharedMlp, flat: str) -> list[set[int]]:
        with torch.no_grad():
            zs = [model.mlp[0](xs), model.mlp[0](model.mlp(xs))]
        return [set(torch.nonzero((z <= 0 if flat == "<=" else z < 0).all(0)).flatten().tolist()) for z in zs]

    dead_a, dead_b = dead(relu, "<="), dead(leaky, "<")
    diff = diff_reports(a, b)
    assert [(s.name, s.name_b, s.presence) for s in diff.sites] == [
        ("mlp.0>relu#0", "mlp.0>leaky_relu#0", "both"), ("mlp.0>relu#1", "mlp.0>leaky_relu#1", "both")]
    for row, da, db in zip(diff.sites, dead_a, dead_b, strict=True):
        assert row.new_dead == tuple(sorted(db - da)) and row.revived == tuple(sorted(da - db))
    assert diff.revived == sum(len(da - db) for da, db in zip(dead_a, dead_b, strict=True)) >= 2
    assert "`mlp.0>relu#0` (B: `mlp.0>leaky_relu#0`)" in render_diff_markdown(diff)


@pytest.mark.parametrize(
    ("pair", "kind", "text"),
    [((0.457, 0.0), "share", "45.7% -> 0.0% (-45.7 pp)"), ((3.0, 1.0), "count", "3 -> 1 (-2)"),
     ((1.6, 3.4), "value", "1.60 -> 3.40 (+1.80)"), ((None, 0.2), "share", "- -> 20.0%"),
     ((2.0, 2.0), "value", "2.00 -> 2.00")],
)  # fmt: skip
def test_change_text(
    pair: tuple[float | None, float | None], kind: Literal["share", "count", "value"], text: str
) -> None:
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
    assert "[warning]" in text and "Dead channels at a ReLU site" in text
    assert "encoder.bn_layers.1>relu" in text and "dead channels 0, 2, 6, 10, 14, 21, 22, 38" in text
    long = _Page()
    long.feed(render_html(with_long_name(report_a)))  # a long site name stays whole: HTML does not fold
    assert LONG_NAME in " ".join(long.text)
