"""What a first-time user meets on the command line and in the reports: site names kept whole in the
80-column tables, one-line errors that name the option and the right file, gate limits named as typed, the
files `audit --out` wrote said, and figures and pages that read well (plain tick numbers, labels above their
bars, flags set as code)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.integrations.writers import JsonlWriter
from deadneuron.render.html import render_html
from deadneuron.render.markdown import ids_text
from deadneuron.render.plots import plot_activation_distributions, plot_active_slots
from deadneuron.report import Report

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SMALL_CNN = ROOT / "examples" / "small_cnn.py"
CNN_ARGS = (SMALL_CNN.with_suffix(".pth"), "--model", f"{SMALL_CNN}:build", "--data", f"{SMALL_CNN}:batches",
            "--batches", "2", "--no-progress")  # fmt: skip


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), stderr
    return lines[0]


# -- the site table at 80 columns: names whole, kinds short --------------------------------------------
LONG_NAMES = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1, self.act_function, self.linear2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        return self.linear2(self.act_function(self.linear1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.encoder.layers:
            x = block(x)
        return x


def build():
    return Net()


def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=gen) for _ in range(2)]
"""


def _long_named_model(tmp_path: Path) -> Path:
    """A model file whose sites are named ``encoder.layers.0.act_function`` (29 characters), and its weights."""
    module = tmp_path / "longnames.py"
    module.write_text(LONG_NAMES)
    namespace: dict[str, Any] = {}
    exec(compile(LONG_NAMES, str(module), "exec"), namespace)  # the factory the CLI imports
    torch.manual_seed(0)
    torch.save(namespace["build"]().state_dict(), module.with_suffix(".pth"))
    return module


def test_the_site_table_keeps_every_site_name_whole_at_80_columns(tmp_path: Path) -> None:
    module = _long_named_model(tmp_path)
    common = (module.with_suffix(".pth"), "--model", f"{module}:build", "--data", f"{module}:batches", "--no-progress")
    code, out, err = run("audit", *common, "--format", "json")
    assert code == 0, err
    names = [s["name"] for s in json.loads(out)["sites"]]
    assert names and all(len(n) >= 28 for n in names), names
    code, out, err = run("audit", *common)
    assert code == 0, err
    lines = out.splitlines()
    for name in names:
        assert any(name in line for line in lines), f"{name} broken over two lines:\n{out}"
    assert "gelu(approximate" not in out  # the kind column is short: gelu, its default approximation implied


@pytest.mark.parametrize(
    ("label", "shown"),
    [("relu", "relu"), ("gelu(approximate=none)", "gelu"), ("gelu(approximate=tanh)", "gelu(tanh)"),
     ("leaky_relu(negative_slope=0.01)", "leaky_relu(0.01)"), ("hardtanh(min_val=-1.0, max_val=1.0)", "hardtanh(-1.0, 1.0)"),
     ("silu(written=x*sigmoid(x))", "silu"), ("gelu(approximate=tanh, written=0.5 * x * (1 + torch.tanh(c * (x + ...)", "gelu(tanh)"),
     ("gelu(approximate=none, written=x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))))", "gelu")],
)  # fmt: skip
def test_a_kind_is_shown_by_its_parameter_values(label: str, shown: str) -> None:
    from deadneuron.render.terminal import kind_cell

    assert kind_cell(label) == shown


def test_compare_keeps_every_site_name_whole_at_80_columns() -> None:
    code, out, err = run("compare", GOLDEN / "report_a.json", GOLDEN / "report_b.json")
    assert code == 0, err
    names = [s["name"] for s in json.loads((GOLDEN / "report_a.json").read_text())["sites"]]
    table = out.split("Sites (A -> B)", 1)[1].splitlines()
    for name in names:
        assert any(line.startswith(name + " ") for line in table), f"{name} broken over two lines:\n{out}"


def test_compare_of_reports_without_a_common_site_says_so(tmp_path: Path) -> None:
    code, out, err = run("audit", *CNN_ARGS, "--format", "json")
    assert code == 0, err
    (tmp_path / "cnn.json").write_text(out)
    code, out, err = run("compare", GOLDEN / "report_a.json", tmp_path / "cnn.json")
    assert code == 0, err
    assert "no activation site in common" in " ".join(out.split())
    code, out, err = run("compare", GOLDEN / "report_a.json", GOLDEN / "report_b.json")
    assert "in common" not in out  # reports of one model: no such note


# -- one-line errors that point at the right place ---------------------------------------------------------
def test_a_syntax_error_names_its_file_and_line_once(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import torch\n\ndef build(:\n    pass\n")
    code, _, err = run("audit", *CNN_ARGS[:1], "--model", f"{tmp_path / 'broken.py'}:build", "--input-shape", "2,3,8,8")
    line = one_error_line(err)
    assert code == 2
    assert "SyntaxError" in line and "broken.py, line 3)" in line
    assert line.count("line 3") == 1, line  # said once, not twice


def test_a_syntax_error_in_a_file_the_model_imports_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("WIDTH = 4\ndef f(:\n    pass\n")
    (tmp_path / "models.py").write_text("import helper\n\ndef build():\n    return None\n")
    code, _, err = run("audit", *CNN_ARGS[:1], "--model", f"{tmp_path / 'models.py'}:build", "--input-shape", "2,3,8,8")
    line = one_error_line(err)
    assert code == 2
    assert "helper.py, line 2)" in line, line
    assert "models.py, line" not in line, line  # the error is not in models.py


def test_a_missing_model_file_is_named_with_its_option(tmp_path: Path) -> None:
    spec = f"{tmp_path / 'missing.py'}:build"
    code, _, err = run("audit", *CNN_ARGS[:1], "--model", spec, "--input-shape", "2,3,8,8")
    line = one_error_line(err)
    assert code == 2
    assert line.startswith(f"deadneuron: error: --model {spec!r}: ") and "no such Python file" in line


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_checkpoint_given_as_a_report_is_one_plain_line(command: str) -> None:
    checkpoint = SMALL_CNN.with_suffix(".pth")
    args = (checkpoint,) if command == "report" else (checkpoint, GOLDEN / "report_a.json")
    code, _, err = run(command, *args)
    line = one_error_line(err)
    assert code == 4
    assert "binary file" in line and "report.json" in line
    assert "codec" not in line and "0x" not in line  # no decoder internals


# -- the gate speaks the user's flags ---------------------------------------------------------------------
def test_a_failed_gate_names_its_limits_as_typed() -> None:
    code, _, err = run("audit", *CNN_ARGS, "--max-dead", "0", "--max-sparsity", "50%")
    assert code == 1
    assert "> --max-dead 0" in err and "> --max-sparsity 50.0%" in err
    assert not re.search(r"(?<![-\w])(max_dead|max_sparsity)\b", err), err


# -- what the report says --------------------------------------------------------------------------------
def test_the_caveats_finding_counts_warnings_in_words() -> None:
    code, out, err = run("audit", CNN_ARGS[0], *CNN_ARGS[1:3], "--input-shape", "2,3,16,16", "--no-progress")
    assert code == 0, err
    assert "1 warning about how the audit ran" in out
    assert "warning: made on random inputs" in " ".join(out.split())
    assert "report warning" not in out  # not the metric's name and a threshold of 1


GUESSED = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.full((1,), 0.5))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x - self.shift)


def build():
    return Net()


def batches():
    return [torch.rand(4, 6, 10, generator=torch.Generator().manual_seed(0))]
"""


def test_a_guessed_axis_is_said_in_words_pointing_at_the_table(tmp_path: Path) -> None:
    (tmp_path / "guess.py").write_text(GUESSED)
    torch.save({"shift": torch.full((1,), 0.5)}, tmp_path / "guess.pth")
    spec = tmp_path / "guess.py"
    code, out, err = run("audit", tmp_path / "guess.pth", "--model", f"{spec}:build", "--data", f"{spec}:batches")
    assert code == 0, err
    assert "1 site whose channel axis was guessed: marked ? in the site table" in out
    assert re.search(r"^act\s+relu\s+10\?", out, flags=re.M), out  # the mark it points at
    assert "guessed axis site" not in out


def test_a_channel_list_never_hides_one_id() -> None:
    assert ids_text(list(range(25))) == ", ".join(map(str, range(25)))
    assert ids_text(list(range(26))).endswith("23 and 2 more")


def test_audit_out_says_what_it_wrote_on_stderr(tmp_path: Path) -> None:
    folder = tmp_path / "rep"
    code, out, err = run("audit", *CNN_ARGS, "--out", folder, "--format", "json")
    assert code == 0, err
    json.loads(out)  # stdout: the report alone
    pngs = sorted(folder.glob("*.png"))
    assert pngs
    assert err.strip() == f"wrote {folder}/: report.json, report.md, report.html and {len(pngs)} figures (PNG)"


def test_html_sets_backquoted_flags_as_code() -> None:
    report = Report.from_json((GOLDEN / "report_a.json").read_text())
    flags = {m for f in report.findings for m in re.findall(r"`([^`]+)`", f.message)}
    assert flags  # the golden report's findings quote flags
    page = render_html(report)
    findings = page.split("<h2>Findings</h2>", 1)[1].split("<h2>", 1)[0]
    assert "`" not in findings
    for flag in flags:
        assert f"<code>{flag}</code>" in findings


def test_the_timeline_table_gives_shares_in_percent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = tmp_path / "health.jsonl"
    with deadneuron.Monitor(model, every=2, optimizer=opt, writers=[JsonlWriter(log)]) as mon:
        for _ in range(4):
            loss = model(torch.randn(8, 4)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    last = json.loads(log.read_text().strip().splitlines()[-1])
    site, figures = next(iter(last["sites"].items()))
    code, out, err = run("timeline", log)
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [site])
    assert f"{100 * figures['flat_fraction']:.1f}%" in row
    assert f"{100 * figures['grad_nonzero']:.1f}%" in row


def test_help_says_what_each_option_takes() -> None:
    for command in ("audit", "patch"):
        code, out, _ = run(command, "--help")
        assert code == 0
        assert "<list[str]>" not in out
        assert "--model MODULE:FACTORY" in out and "--select GLOB" in out and "--model-arg KEY=VALUE" in out


# -- figures ----------------------------------------------------------------------------------------------
def test_the_moments_axis_ticks_are_plain_numbers_with_one_in_the_linear_part() -> None:
    report = Report.from_json((GOLDEN / "report_a.json").read_text())
    fig = plot_activation_distributions(report)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog"  # the golden report's outliers make it so
    linthresh = ax.xaxis.get_transform().linthresh
    labels = [t.get_text() for t in ax.get_xticklabels()]
    values = [float(text) for text in labels]  # "1", "10": no 10^0 mathtext
    assert any(0 < v <= linthresh for v in values), (labels, linthresh)


def test_active_slot_counts_sit_above_their_bars() -> None:
    report = Report.from_json((GOLDEN / "report_a.json").read_text())
    assert report.slots is not None
    fig = plot_active_slots(report.slots)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    renderer = canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_bbox_patch() is not None]
    tops = {k: c for k, c in enumerate(report.slots.active_histogram) if c}
    assert len(labels) == len(tops)
    for text, (k, count) in zip(labels, tops.items(), strict=True):
        assert text.get_text() == str(count)
        bottom = text.get_bbox_patch().get_window_extent(renderer).y0  # type: ignore[union-attr]
        assert bottom >= ax.transData.transform((k, count))[1], f"the label of bar {k} covers its top"
