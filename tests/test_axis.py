"""Channel axis derived, not guessed (DESIGN section 3): per-channel figures on layouts where the producer
of a site's input is not a known layer, each against the numpy oracle over tensors the model stored itself.

Every model plants dead channels (a weight row of 0 and a bias of -100, or a shift of +100) and feeds
lengths or spatial sizes that differ from its channel count, so that reading the wrong dim gives another
channel count and other dead channels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.errors import UsageError
from deadneuron.render.markdown import render_markdown
from deadneuron.rules import attach_findings
from tests import zoo


def plant(layer: nn.Module, channels: Sequence[int]) -> None:
    """Output channels of ``layer`` (conv or linear) that stay at -100 whatever the input."""
    with torch.no_grad():
        for c in channels:
            layer.weight[c] = 0.0
            layer.bias[c] = -100.0


class ConvDropoutReLU(nn.Module):
    """Conv1d -> padding -> Dropout -> ReLU module: (N, C, L), read on dim 1; then the ReLU's output
    through Dropout, minus 1, into F.relu (carried through the activation module)."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv, self.pad = nn.Conv1d(3, 8, 3, padding=1), nn.ConstantPad1d(1, 0.0)
        self.drop, self.act = nn.Dropout(0.3), nn.ReLU()
        plant(self.conv, [1, 5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.drop(self.pad(self.conv(x)))
        self.tap.pre("act", z, 1)
        h = self.tap.post("act", self.act(z))
        z = self.drop(h) - 1.0
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


class ResBlock1d(nn.Module):
    """A 1-D ResNet block: ``F.relu(conv2(relu(conv1(x))) + x)``."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv1, self.conv2 = nn.Conv1d(8, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1)
        plant(self.conv2, [2, 6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        self.tap.pre("conv1>relu", z, 1)
        out = self.tap.post("conv1>relu", F.relu(z))
        z = self.conv2(out) + x
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


class Wrapped(nn.Module):
    def __init__(self, scale: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(8, 1) + 0.5) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out * self.gain if self.gain is not None else out


class WrapperModel(nn.Module):
    """Wrapper modules around a Conv1d: one returns the conv's tensor, one scales it per channel."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.plain, self.scaled = Wrapped(scale=False), Wrapped(scale=True)
        plant(self.plain.conv, [0, 7])
        plant(self.scaled.conv, [3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.plain(x)
        self.tap.pre("plain>relu", z, 1)
        a = self.tap.post("plain>relu", F.relu(z))
        z = self.scaled(x)
        self.tap.pre("scaled>relu", z, 1)
        return a + self.tap.post("scaled>relu", torch.relu(z))


class ChannelsLast(nn.Module):
    """A conv output permuted to (N, H, W, C), plus a (W, C) table, then ReLU: read on the last dim."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 8))
        plant(self.conv, [1, 4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).permute(0, 2, 3, 1) + self.pos
        self.tap.pre("relu", z, -1)
        return self.tap.post("relu", F.relu(z))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, permute to channels-last, LayerNorm, Linear, GELU, Linear, permute back, residual."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
        plant(self.fc1, [4, 30])
        plant(self.fc2, [3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        self.tap.pre("act", z, -1)
        h = self.fc2(self.tap.post("act", self.act(z))).permute(0, 3, 1, 2)
        z = x + h
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


class PoolBetween(nn.Module):
    """Pooling between conv and activation: a MaxPool1d module, then F.avg_pool1d."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv1, self.pool, self.act = nn.Conv1d(3, 8, 3, padding=1), nn.MaxPool1d(2), nn.ReLU()
        self.conv2 = nn.Conv1d(8, 6, 3, padding=1)
        plant(self.conv1, [2])
        plant(self.conv2, [0, 5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.conv1(x))
        self.tap.pre("act", z, 1)
        h = self.tap.post("act", self.act(z))
        z = F.avg_pool1d(self.conv2(h), 2)
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


class ReshapeKeeps(nn.Module):
    """(N, C, H, W) -> flatten(2) -> (N, C, HW); then a Linear on (N, HW, C) reshaped to (N, H, W, C')."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6)
        plant(self.conv, [6])
        plant(self.fc, [1, 2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        z = self.conv(x).flatten(2)
        self.tap.pre("relu#0", z, 1)
        a = self.tap.post("relu#0", F.relu(z))
        z = self.fc(a.transpose(1, 2)).reshape(n, h, w, 6)
        self.tap.pre("relu#1", z, 3)
        return self.tap.post("relu#1", F.relu(z))


class CatLength(nn.Module):
    """Two conv outputs concatenated along the length dim, then ReLU."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        self.a, self.b = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(3, 8, 5, padding=2)
        plant(self.a, [2, 5])  # channel 2 still fires in b's half: not dead
        plant(self.b, [5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.a(x), self.b(x)], dim=2)
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


class FunctionalLayers(nn.Module):
    """No layer modules: F.conv1d and F.linear with the model's own weights."""

    def __init__(self, tap: zoo.Tap) -> None:
        super().__init__()
        self.tap = tap
        conv, fc = nn.Conv1d(3, 8, 3, padding=1), nn.Linear(8, 5)
        plant(conv, [4])
        plant(fc, [0])
        self.w1, self.b1 = nn.Parameter(conv.weight.detach().clone()), nn.Parameter(conv.bias.detach().clone())
        self.w2, self.b2 = nn.Parameter(fc.weight.detach().clone()), nn.Parameter(fc.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv1d(x, self.w1, self.b1, padding=1)
        self.tap.pre("relu#0", z, 1)
        a = self.tap.post("relu#0", F.relu(z))
        z = F.linear(a.mT, self.w2, self.b2)[:, 1:]  # (N, L-1, 5)
        self.tap.pre("relu#1", z, -1)
        return self.tap.post("relu#1", F.relu(z))


class Shifted(nn.Module):
    """An activation on the raw input (N, C, L) minus a per-channel shift: nothing fixes the layout."""

    def __init__(self, tap: zoo.Tap | None = None) -> None:
        super().__init__()
        self.tap = tap or zoo.Tap()
        self.shift = nn.Parameter(torch.zeros(6, 1))
        with torch.no_grad():
            self.shift[[1, 4]] = 100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x - self.shift
        self.tap.pre("relu", z, 1)
        return self.tap.post("relu", F.relu(z))


def lengths(channels: int, sizes: Iterable[int], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, channels, size, generator=g) for size in sizes]


def images(channels: int, n: int = 2, h: int = 6, w: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, channels, h, w, generator=g) for _ in range(2)]


# model, batches, {site: (kind, planted dead channels, axis source)}
CASES: dict[str, tuple[Callable[[zoo.Tap], nn.Module], Callable[[], list[torch.Tensor]], dict[str, tuple[str, list[int], str]]]] = {
    "conv1d-dropout-relu": (ConvDropoutReLU, lambda: lengths(3, (9, 5, 1)),
                            {"act": ("relu", [1, 5], "traced"), "relu": ("relu", [1, 5], "traced")}),
    "resnet1d-residual": (ResBlock1d, lambda: lengths(8, (10, 4)),
                          {"conv1>relu": ("relu", [], "producer"), "relu": ("relu", [2, 6], "traced")}),
    "wrapper-modules": (WrapperModel, lambda: lengths(3, (11, 1)),
                        {"plain>relu": ("relu", [0, 7], "producer"), "scaled>relu": ("relu", [3], "traced")}),
    "channels-last-sum": (ChannelsLast, lambda: images(3), {"relu": ("relu", [1, 4], "traced")}),
    "convnext-block": (ConvNeXtBlock, lambda: images(8),
                       {"act": ("gelu", [4, 30], "producer"), "relu": ("relu", [3], "traced")}),
    "pool-between": (PoolBetween, lambda: lengths(3, (12, 20)),
                     {"act": ("relu", [2], "producer"), "relu": ("relu", [0, 5], "producer")}),
    "reshape-keeps-channels": (ReshapeKeeps, lambda: images(3),
                               {"relu#0": ("relu", [6], "traced"), "relu#1": ("relu", [1, 2], "traced")}),
    "cat-along-length": (CatLength, lambda: lengths(3, (7, 3)), {"relu": ("relu", [5], "traced")}),
    "functional-layers": (FunctionalLayers, lambda: lengths(3, (6, 9)),
                          {"relu#0": ("relu", [4], "producer"), "relu#1": ("relu", [0], "traced")}),
}


def run_case(factory: Callable[[zoo.Tap], nn.Module], batches: list[torch.Tensor], **kwargs: object) -> tuple[deadneuron.Report, zoo.Tap]:
    torch.manual_seed(0)
    tap = zoo.Tap()
    model = factory(tap).eval()
    tap.on = True
    with torch.no_grad():
        for b in batches:
            model(b)
    tap.on = False
    return deadneuron.audit(model, batches, progress=False, **kwargs), tap  # type: ignore[arg-type]


def assert_matches_oracle(report: deadneuron.Report, tap: zoo.Tap, name: str, kind: str, planted: list[int]) -> None:
    want = zoo.oracle(tap, name, kind)
    got = report.sites[name]
    assert set(planted) <= set(want.dead), f"{name}: the oracle sees the planted channels"
    assert got.channels == len(want.zero), name
    assert got.n == want.n, name
    np.testing.assert_array_equal(np.round(np.array(got.channel_zero) * got.n), want.zero, err_msg=name)
    flat = np.round(np.array(got.channel_flat) * got.n)
    if kind == "relu":
        np.testing.assert_array_equal(flat, want.flat, err_msg=name)
    else:  # smooth kinds: thresholds on a 1e-3 grid (as in test_audit_oracle)
        assert np.abs(flat - want.flat).max() <= max(2, 0.01 * want.n), name
    assert list(got.dead_channels) == want.dead, name
    assert list(got.dormant_channels) == want.dormant, name


@pytest.mark.parametrize("case", list(CASES))
def test_axis_is_derived_and_figures_match_the_oracle(case: str) -> None:
    factory, data, sites = CASES[case]
    report, tap = run_case(factory, data())
    assert sorted(report.sites) == sorted(sites)
    for name, (kind, planted, source) in sites.items():
        assert_matches_oracle(report, tap, name, kind, planted)
        assert report.sites[name].axis_source == source, name
        assert report.sites[name].channel_axis == tap.axis[name], name
    findings = attach_findings(report).findings
    assert not [f for f in findings if f["rule"] == "axis-guessed"]


def test_attention_output_in_a_tuple_is_traced_through_the_residual() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.attn(x, x, x, need_weights=False)[0])

    report = deadneuron.audit(Block().eval(), [torch.randn(2, 5, 8)], progress=False)
    (site,) = report.sites.values()
    assert (site.channel_axis, site.axis_source, site.channels) == (2, "traced", 8)


def test_two_dims_have_one_candidate_and_no_warning() -> None:
    class Raw(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x - 1)

    report = attach_findings(deadneuron.audit(Raw(), [torch.randn(4, 7)], progress=False))
    (site,) = report.sites.values()
    assert (site.channel_axis, site.axis_source, site.channels) == (1, "rank", 7)
    assert not [f for f in report.findings if f["rule"] == "axis-guessed"]


def test_unknown_axis_is_guessed_warned_and_marked_then_set_by_the_user() -> None:
    data = lengths(6, (10, 10))
    report, tap = run_case(Shifted, data)
    site = report.sites["relu"]
    assert (site.axis_source, site.channel_axis, site.channels) == ("guessed", 2, 10)  # the length, misread
    assert list(site.dead_channels) != [1, 4]
    report = attach_findings(report)
    (finding,) = [f for f in report.findings if f["rule"] == "axis-guessed"]
    assert finding["sites"] == ["relu"] and "channel_axis={'relu': AXIS}" in finding["message"]
    assert "deadneuron audit" not in finding["message"], "an audit from Python has no command line to repeat"
    table = render_markdown(report)
    assert "| `relu` | relu | 10? |" in table and "channel axis guessed" in table
    for axis in (1, -2):
        fixed, _ = run_case(Shifted, data, channel_axis={"relu": axis})
        assert fixed.sites["relu"].axis_source == "user"
        assert_matches_oracle(fixed, tap, "relu", "relu", [1, 4])
        assert not fixed.warnings
        table = render_markdown(fixed)
        assert "| `relu` | relu | 6 |" in table and "channel axis guessed" not in table


def test_guessed_axis_whose_size_changes_between_batches_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"site 'relu': its channel axis 2 \(guessed\) has 4 entries.*--channel-axis 'relu=AXIS'"):
        run_case(Shifted, lengths(6, (10, 4)))
    report, _ = run_case(Shifted, lengths(6, (10, 4, 1)), channel_axis={"rel*": 1})
    assert report.sites["relu"].channels == 6


def test_override_that_matches_nothing_or_does_not_fit() -> None:
    report, _ = run_case(ConvDropoutReLU, lengths(3, (9,)), channel_axis={"nothing.here": 1, "act": 1})
    assert report.sites["act"].axis_source == "user"
    assert [w for w in report.warnings if "'nothing.here' matched no site" in w]
    with pytest.raises(UsageError, match="channel axis 3 set for 'act' does not fit site 'act'"):
        run_case(ConvDropoutReLU, lengths(3, (9,)), channel_axis={"act": 3})
    with pytest.raises(UsageError, match="integer dim"):
        run_case(ConvDropoutReLU, lengths(3, (9,)), channel_axis={"act": "1"})


def test_shared_site_names_with_an_index_take_an_override() -> None:
    report, _ = run_case(ReshapeKeeps, images(3), channel_axis={"relu#1": 1})
    assert report.sites["relu#0"].axis_source == "traced"
    assert (report.sites["relu#1"].axis_source, report.sites["relu#1"].channel_axis) == ("user", 1)


# -- the CLI flag ---------------------------------------------------------------------------------------------

MODEL_FILE = '''
import torch
from torch import nn
import torch.nn.functional as F

class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(6, 1))

    def forward(self, x):
        return F.relu(x - self.shift)

def build():
    return Shifted()

def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 6, 10, generator=g) for _ in range(2)]
'''


@pytest.fixture(scope="module")
def shifted_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("axis")
    source = folder / "shifted.py"
    source.write_text(MODEL_FILE)
    ckpt = folder / "shifted.pth"
    torch.save(Shifted().state_dict(), ckpt)
    return ckpt, source


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_flag_sets_the_axis(shifted_ckpt: tuple[Path, Path]) -> None:
    ckpt, source = shifted_ckpt
    base = ["audit", str(ckpt), "--model", f"{source}:build", "--data", f"{source}:batches", "--format", "json"]
    code, out, err = cli(*base)
    assert code == 0, err
    site = json.loads(out)["sites"][0]
    assert (site["axis_source"], site["channels"]) == ("guessed", 10)
    assert "axis-guessed" in [f["rule"] for f in json.loads(out)["findings"]]
    code, out, err = cli(*base, "--channel-axis", "relu=1", "--channel-axis", "unused.*=-1")
    assert code == 0, err
    report = json.loads(out)
    site = report["sites"][0]
    x = torch.cat([b.transpose(0, 1).reshape(6, -1) for b in zoo_batches(source)], dim=1)  # (C, N*L)
    want = (x - Shifted().shift.detach() <= 0).sum(1).numpy()  # the oracle: planted shift +100 on 1 and 4
    assert (site["axis_source"], site["channels"], site["n"]) == ("user", 6, x.shape[1])
    np.testing.assert_array_equal(np.round(np.array(site["channel_flat"]) * site["n"]), want)
    assert site["dead_channels"] == [1, 4]
    assert any("'unused.*' matched no site" in w for w in report["meta"]["warnings"])
    assert "axis-guessed" not in [f["rule"] for f in report["findings"]]


def zoo_batches(source: Path) -> list[torch.Tensor]:
    scope: dict[str, object] = {}
    exec(compile(source.read_text(), str(source), "exec"), scope)
    return scope["batches"]()  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize("flag", ["relu", "relu=x", "=1", "relu=1.5"])
def test_cli_flag_bad_syntax_is_one_line_exit_2(shifted_ckpt: tuple[Path, Path], flag: str) -> None:
    ckpt, source = shifted_ckpt
    code, _, err = cli("audit", str(ckpt), "--model", f"{source}:build", "--data", f"{source}:batches",
                       "--channel-axis", flag)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and "--channel-axis takes GLOB=AXIS" in lines[0], err


class _ConvLayerNorm(nn.Module):
    """A conv map normalised over (C, H, W) by a LayerNorm, as a module or as F.layer_norm: the channels stay on
    dim 1 (the layer norm's last dim is W)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 6, 3)
        self.ln = nn.LayerNorm([6, 5, 7])
        self.act = nn.ReLU()
        self.z: list[torch.Tensor] = []
        with torch.no_grad():
            self.ln.bias.view(6, 5, 7)[2] = -100.0  # channel 2 never positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = F.layer_norm(h, [6, 5, 7], self.ln.weight, self.ln.bias) if self.functional else self.ln(h)
        self.z.append(h.detach().clone())
        return self.act(h)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_a_layer_norm_over_several_dims_keeps_its_input_s_channel_axis(functional: bool) -> None:
    torch.manual_seed(0)
    model = _ConvLayerNorm(functional).eval()
    report = deadneuron.audit(model, [torch.randn(4, 3, 7, 9)], progress=False, rules=False)
    (site,) = report.sites.values()
    z = model.z[0].transpose(0, 1).reshape(6, -1)  # the oracle: the model's own tensor, channels on dim 1
    assert (site.channel_axis, site.channels) == (1, 6)
    assert list(site.dead_channels) == torch.nonzero((z <= 0).all(1)).flatten().tolist() == [2]
