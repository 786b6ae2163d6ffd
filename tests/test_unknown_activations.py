"""Activations beyond the common ones: every built-in kind is measured right, unknown ones are named,
the user can declare their own, and an audit that measured nothing is an error (never a pass).

Each model stores its own pre-activation z and activation a (`zoo.Tap`); the oracle applies the
closed-form flat region of each kind (delta = 0.05) to those tensors with numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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
from deadneuron.probe.coverage import looks_like_activation
from deadneuron.registry import ActivationRegistry
from deadneuron.report import Report
from deadneuron.testing import assert_healthy
from tests.zoo import Tap

DELTA = 0.05
CHANNELS = 8

# --- closed-form flat regions (|f'| <= DELTA * max |f'|) ------------------------------------------

Mask = Callable[[np.ndarray], np.ndarray]


def _tails(lo: float, hi: float = math.inf) -> Mask:
    return lambda z: (z <= lo) | (z >= hi)


def _interval(radius: float) -> Mask:
    return lambda z: np.abs(z) <= radius


NONE: Mask = lambda z: np.zeros(z.shape, dtype=bool)  # noqa: E731
SOFTSIGN = 1 / math.sqrt(DELTA) - 1  # f' = 1 / (1 + |z|)^2, max 1
LOGSIGMOID = math.log((1 - DELTA) / DELTA)  # f' = 1 - sigmoid(z), max 1 (at -inf)
TANHSHRINK = math.atanh(math.sqrt(DELTA))  # f' = tanh(z)^2, max 1 (at +-inf)
MYACT = math.log(DELTA / 0.1)  # f' = 0.1 e^z below 0, 1 above
ERF = math.sqrt(math.log(1 / DELTA))  # f' = 2/sqrt(pi) e^(-z^2), max at 0


def _myact(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.1 * torch.expm1(x))


class MyAct(nn.Module):
    """A user's activation made of ops no probe recognises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _myact(x)


class KindNet(nn.Module):
    """Linear(6, 8) then one activation (a module, or a function called in forward); planted channels
    get a near-zero weight and a bias that keeps them in (or out of) the flat region."""

    def __init__(self, tap: Tap, act: nn.Module | Callable[[torch.Tensor], torch.Tensor], planted: dict[int, float]) -> None:
        super().__init__()
        self.tap = tap
        self.fc = nn.Linear(6, CHANNELS)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.fn = act
        with torch.no_grad():
            for c, bias in planted.items():
                self.fc.weight[c] *= 0.01
                self.fc.bias[c] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        self.tap.pre("site", z, -1)
        act = self.act if hasattr(self, "act") else self.fn
        return self.tap.post("site", act(z))


def _batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 6, generator=g) for _ in range(n)]


def _oracle(tap: Tap, mask: Mask) -> tuple[list[int], list[int]]:
    """(flat count per channel, dead channels) from the tensors the model stored."""
    z = np.concatenate([t.reshape(-1, CHANNELS) for t in tap.z["site"]])
    flat = mask(z).sum(0)
    return [int(f) for f in flat], [int(c) for c in np.flatnonzero(flat == z.shape[0])]


def _audit_one(model: KindNet, **kw: object) -> tuple[Report, deadneuron.SiteHealth]:
    torch.manual_seed(0)
    model.tap.on = False
    report = deadneuron.audit(model.eval(), _batches(), progress=False, delta=DELTA, **kw)  # type: ignore[arg-type]
    model.tap.on = True
    with torch.no_grad():
        for b in _batches():
            model(b)
    assert len(report.sites) == 1, list(report.sites)
    return report, next(iter(report.sites.values()))


def _check(model: KindNet, mask: Mask, kind: str, planted_dead: list[int], **kw: object) -> Report:
    report, site = _audit_one(model, **kw)
    flat, dead = _oracle(model.tap, mask)
    assert dead == planted_dead, "the planted channels are not what the oracle says: the test itself is off"
    assert site.kind == kind
    assert list(site.dead_channels) == dead
    assert site.n == 48 and [round(f * site.n) for f in site.channel_flat] == flat
    return report


# (module, closed-form mask, kind, planted biases, channels dead by construction)
MODULES = [
    pytest.param(nn.Hardsigmoid(), _tails(-3, 3), "hardsigmoid", {1: -6.0, 4: 6.0}, [1, 4], id="hardsigmoid"),
    pytest.param(nn.Hardsigmoid(inplace=True), _tails(-3, 3), "hardsigmoid", {2: -6.0}, [2], id="hardsigmoid-inplace"),
    pytest.param(nn.Softsign(), _tails(-SOFTSIGN, SOFTSIGN), "softsign", {0: -9.0, 5: 9.0}, [0, 5], id="softsign"),
    pytest.param(nn.RReLU(0.0, 0.05), _tails(0.0), "rrelu", {3: -4.0}, [3], id="rrelu-small-slopes"),
    pytest.param(nn.RReLU(), NONE, "rrelu", {3: -4.0}, [], id="rrelu-default-never-flat"),
    pytest.param(nn.LogSigmoid(), _tails(-math.inf, LOGSIGMOID), "logsigmoid", {6: 9.0}, [6], id="logsigmoid"),
    pytest.param(nn.Hardshrink(0.4), _interval(0.4), "hardshrink", {2: 0.0, 7: 0.1}, [2, 7], id="hardshrink"),
    pytest.param(nn.Softshrink(0.4), _interval(0.4), "softshrink", {2: 0.0}, [2], id="softshrink"),
    pytest.param(nn.Tanhshrink(), _interval(TANHSHRINK), "tanhshrink", {5: 0.0}, [5], id="tanhshrink"),
    pytest.param(nn.Threshold(0.3, -1.0), _tails(0.3), "threshold", {1: -3.0}, [1], id="threshold-monotone"),
    pytest.param(nn.Threshold(0.3, 5.0), _tails(0.3), "threshold", {1: -3.0}, [1], id="threshold-above"),
    pytest.param(nn.Threshold(0.3, 5.0, inplace=True), _tails(0.3), "threshold", {4: -3.0}, [4], id="threshold-inplace"),
]


@pytest.mark.parametrize(("act", "mask", "kind", "planted", "dead"), MODULES)
def test_builtin_module_kinds_match_the_oracle(act: nn.Module, mask: Mask, kind: str, planted: dict[int, float], dead: list[int]) -> None:
    _check(KindNet(Tap(), act, planted), mask, kind, dead)


FUNCTIONS = [
    pytest.param(F.hardsigmoid, _tails(-3, 3), "hardsigmoid", {1: 6.0}, [1], id="F.hardsigmoid"),
    pytest.param(F.softsign, _tails(-SOFTSIGN, SOFTSIGN), "softsign", {0: -9.0}, [0], id="F.softsign"),
    pytest.param(lambda z: F.rrelu(z, 0.0, 0.04), _tails(0.0), "rrelu", {3: -4.0}, [3], id="F.rrelu"),
    pytest.param(F.logsigmoid, _tails(-math.inf, LOGSIGMOID), "logsigmoid", {6: 9.0}, [6], id="F.logsigmoid"),
    pytest.param(lambda z: F.hardshrink(z, 0.3), _interval(0.3), "hardshrink", {2: 0.0}, [2], id="F.hardshrink"),
    pytest.param(lambda z: z.hardshrink(0.3), _interval(0.3), "hardshrink", {2: 0.0}, [2], id="Tensor.hardshrink"),
    pytest.param(lambda z: F.softshrink(z, 0.3), _interval(0.3), "softshrink", {4: 0.0}, [4], id="F.softshrink"),
    pytest.param(F.tanhshrink, _interval(TANHSHRINK), "tanhshrink", {5: 0.0}, [5], id="F.tanhshrink"),
    pytest.param(lambda z: F.threshold(z, 0.25, 7.0), _tails(0.25), "threshold", {1: -3.0}, [1], id="F.threshold"),
    pytest.param(lambda z: F.threshold(z.clone(), 0.25, 7.0, True), _tails(0.25), "threshold", {1: -3.0}, [1],
                 id="F.threshold-inplace-positional"),  # z is overwritten: the flat test reads it before
    pytest.param(lambda z: torch.clamp(z, min=0), _tails(0.0), "relu", {2: -3.0}, [2], id="torch.clamp-min0"),
    pytest.param(lambda z: z.clamp(min=0.0), _tails(0.0), "relu", {2: -3.0}, [2], id="Tensor.clamp-min0"),
    pytest.param(lambda z: z.clamp_min(0), _tails(0.0), "relu", {2: -3.0}, [2], id="Tensor.clamp_min"),
    pytest.param(lambda z: z.clone().clamp_(min=0), _tails(0.0), "relu", {2: -3.0}, [2], id="Tensor.clamp_-inplace"),
    pytest.param(lambda z: torch.clamp(z, -0.5, 2.0), _tails(-0.5, 2.0), "hardtanh", {0: -3.0, 7: 3.0}, [0, 7], id="torch.clamp-both"),
    pytest.param(lambda z: z.clip(0, 6), _tails(0.0, 6.0), "relu6", {0: -3.0, 7: 9.0}, [0, 7], id="Tensor.clip-0-6"),
]


@pytest.mark.parametrize(("fn", "mask", "kind", "planted", "dead"), FUNCTIONS)
def test_builtin_functional_kinds_match_the_oracle(fn: Callable[[torch.Tensor], torch.Tensor], mask: Mask, kind: str,
                                                   planted: dict[int, float], dead: list[int]) -> None:  # fmt: skip
    _check(KindNet(Tap(), fn, planted), mask, kind, dead)


def test_clamp_that_is_not_an_activation_is_no_site() -> None:
    """A one-sided clamp away from 0 (a numerical guard) and a tensor bound are not sites."""
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    seen: list[str] = []

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            seen.append("ran")
            return h.clamp(min=1e-6) + h.clamp(max=3.0) + h.clamp(min=torch.zeros(()))

    report = deadneuron.audit(Guarded().eval(), _batches(1), progress=False)
    assert seen and list(report.sites) == ["body.1"]


# --- unknown activations are named --------------------------------------------------------------


class Zoo(nn.Module):
    """A recognised ReLU, plus a GLU module, F.glu, and a user's MyAct: the last three are unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.enc = nn.Module()
        self.enc.act = MyAct()
        self.gate = nn.GLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc.act(self.relu(self.fc(x)))
        return self.gate(h) + F.glu(h, dim=-1)


def test_glu_and_custom_activations_are_named_in_warnings() -> None:
    report = deadneuron.audit(Zoo().eval(), _batches(1), progress=False)
    assert list(report.sites) == ["relu"]
    warnings = report.meta["warnings"]
    mine = [w for w in warnings if "'enc.act'" in w]
    assert len(mine) == 1 and "(MyAct)" in mine[0] and "register_activation(MyAct" in mine[0]
    glu = [w for w in warnings if "'gate'" in w]
    assert len(glu) == 1 and "(GLU)" in glu[0] and "halves the channel dim" in glu[0] and "not measured" in glu[0]
    functional = [w for w in warnings if w.startswith("glu()")]
    assert len(functional) == 1 and "halves the channel dim" in functional[0]
    assert len(warnings) == 3


class GELUActivation(nn.Module):
    """Like Hugging Face's: a leaf whose forward calls a recognised function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class SinusoidalPosEmb(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(x)


class NoFalseAlarms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.Sequential(nn.ReLU())  # a container named "act" made of a recognised activation
        self.act_block = type("ActBlock", (nn.Module,), {})()  # a custom container holding one
        self.act_block.inner = nn.GELU()
        self.hf = GELUActivation()
        self.pos = SinusoidalPosEmb()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_block.inner(self.act(self.fc(x)))
        return self.softmax(self.pos(self.hf(h)))


def test_no_warning_for_containers_and_leaves_made_of_recognised_activations() -> None:
    report = deadneuron.audit(NoFalseAlarms().eval(), _batches(1), progress=False)
    assert report.meta["warnings"] == []
    assert set(report.sites) == {"act.0", "act_block.inner", "act_block.inner>gelu"}  # the last: in hf


def test_a_functional_leaf_is_unknown_when_functional_probing_is_off() -> None:
    report = deadneuron.audit(NoFalseAlarms().eval(), _batches(1), progress=False, functional=False)
    assert [w for w in report.meta["warnings"] if "'hf'" in w and "(GELUActivation)" in w]


@pytest.mark.parametrize(
    ("name", "looks"),
    [*[(n, True) for n in ("MyAct", "act_fn", "QuickGELU", "SwiGLU", "StarReLU", "Sine", "ScaledTanh", "MySELU", "Snake")],
     *[(n, False) for n in ("SinusoidalPosEmb", "ActNorm", "SigmoidFocalLoss", "Softmax", "PixelUnshuffle",
                            "Interaction", "TransformerEncoderLayer", "Upsampling", "Impact")]],
)  # fmt: skip
def test_which_class_names_look_like_activations(name: str, looks: bool) -> None:
    assert looks_like_activation(name) is looks


# --- register_activation --------------------------------------------------------------------------

PLANTED = {1: -5.0, 6: -8.0}


def test_registered_module_is_measured_and_removal_brings_the_warning_back() -> None:
    model = KindNet(Tap(), MyAct(), PLANTED)
    with pytest.raises(UsageError):  # only an unknown activation: nothing measured
        deadneuron.audit(model.eval(), _batches(), progress=False)
    handle = deadneuron.register_activation(MyAct, _myact)
    try:
        report = _check(model, _tails(MYACT), "MyAct", [1, 6])
        assert report.meta["warnings"] == []
        assert report.sites["act"].label == "MyAct"
    finally:
        handle.remove()
    handle.remove()  # idempotent
    mixed = nn.Sequential(nn.Linear(6, 8), MyAct(), nn.ReLU())
    report = deadneuron.audit(mixed, _batches(1), progress=False)
    assert list(report.sites) == ["2"] and [w for w in report.meta["warnings"] if "'1' (MyAct)" in w]
    with deadneuron.register_activation(MyAct, _myact):
        report = deadneuron.audit(mixed, _batches(1), progress=False)
    assert list(report.sites) == ["1", "2"] and report.sites["1"].kind == "MyAct" and report.meta["warnings"] == []
    report = deadneuron.audit(mixed, _batches(1), progress=False)
    assert list(report.sites) == ["2"] and [w for w in report.meta["warnings"] if "'1' (MyAct)" in w]
    with pytest.raises(UsageError, match=r"'act' \(MyAct\)"):
        deadneuron.audit(model.eval(), _batches(), progress=False)


def test_register_defaults_to_a_fresh_instance_and_works_as_a_context_manager() -> None:
    model = KindNet(Tap(), MyAct(), PLANTED)
    with deadneuron.register_activation(MyAct, name="myact"):
        _check(model, _tails(MYACT), "myact", [1, 6])
    with pytest.raises(UsageError, match="MyAct"):
        deadneuron.audit(model.eval(), _batches(), progress=False)


def test_an_explicit_registry_leaves_the_default_alone() -> None:
    registry = ActivationRegistry()
    registry.register(MyAct, _myact)
    model = KindNet(Tap(), MyAct(), PLANTED)
    _check(model, _tails(MYACT), "MyAct", [1, 6], activations=registry)
    with pytest.raises(UsageError):
        deadneuron.audit(model.eval(), _batches(), progress=False)


def test_registered_torch_function_is_a_site() -> None:
    """torch.erf is no activation by default; registered, its calls in forward are sites."""
    model = KindNet(Tap(), torch.erf, {0: 4.0, 3: -4.0})
    with pytest.raises(UsageError):
        deadneuron.audit(model.eval(), _batches(), progress=False)
    with deadneuron.register_activation(torch.erf):
        report = _check(model, _tails(-ERF, ERF), "erf", [0, 3])
    assert list(report.sites) == ["fc>erf"]


def test_register_refuses_what_the_probe_cannot_see_or_derive() -> None:
    with pytest.raises(UsageError, match=r"wrap it in an nn\.Module"):
        deadneuron.register_activation(_myact)
    with pytest.raises(UsageError, match="class, not an instance"):
        deadneuron.register_activation(MyAct())  # type: ignore[arg-type]

    class NeedsArgs(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()

    with pytest.raises(UsageError, match="pass fn"):
        deadneuron.register_activation(NeedsArgs)
    with pytest.raises(UsageError, match="not elementwise"):
        deadneuron.register_activation(MyAct, lambda z: z.sum())
    assert MyAct not in deadneuron.registry.default_registry


# --- functional PReLU: its region is not read back to the host inside a hook ----------------------


def test_functional_prelu_region_needs_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    slope = torch.tensor([0.01])  # one slope for all channels, small: z <= 0 is flat
    model = KindNet(Tap(), lambda z: F.prelu(z, slope), {2: -3.0})
    model.tap.on = True
    batches = _batches()
    with torch.inference_mode(), deadneuron.Recorder(model.eval(), delta=DELTA) as rec:
        def no_host_read(*a: object) -> None:
            raise AssertionError("a tensor was read back to the host inside a hook")

        monkeypatch.setattr(torch.Tensor, "item", no_host_read)
        monkeypatch.setattr(torch.Tensor, "__float__", no_host_read)
        for b in batches:
            rec.start_batch()
            model(b)
        monkeypatch.undo()
        (result,) = rec.results()
    flat, dead = _oracle(model.tap, _tails(0.0))
    assert dead == [2] and [int(f) for f in result.summary.flat] == flat


# --- nothing measured is an error; so is a select that matches nothing ---------------------------


class OnlyMyAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = MyAct()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def test_no_site_is_a_usage_error_naming_what_was_found() -> None:
    with pytest.raises(UsageError) as info:
        deadneuron.audit(OnlyMyAct(), _batches(1), progress=False)
    message = str(info.value)
    assert message.startswith("no activation site was measured")
    assert "3 modules" in message and "'act' (MyAct)" in message and "\n" not in message


def test_assert_healthy_fails_on_a_model_with_only_an_unknown_activation() -> None:
    model = OnlyMyAct()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)  # every channel dead, were it measured
    with pytest.raises(UsageError):
        assert_healthy(model, _batches(1))
    empty = Report.build([], meta={"model": "OnlyMyAct"})
    with pytest.raises(AssertionError, match="no activation site"):
        assert_healthy(empty)


def test_empty_select_is_a_usage_error_naming_globs_and_sites() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.GELU())
    with pytest.raises(UsageError) as info:
        deadneuron.audit(model, _batches(1), progress=False, select=["encoder.*", "kind:tanh"])
    message = str(info.value)
    assert "'encoder.*'" in message and "'kind:tanh'" in message
    assert "(sites: 1, 3)" in message and "\n" not in message
    report = deadneuron.audit(model, _batches(1), progress=False, select=["gelu", "encoder.*"])
    assert list(report.sites) == ["3"]
    assert any("'encoder.*'" in w for w in report.meta["warnings"])


# --- the CLI: one line, exit 2 ---------------------------------------------------------------------

MODEL_FILE = '''
import torch
from torch import nn


class MyAct(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * torch.expm1(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = MyAct()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) if {only_mine} else self.relu(self.act(self.fc(x)))


def build():
    return Net()
'''


def _cli(tmp_path: Path, only_mine: bool, *extra: str) -> tuple[int, str, str]:
    model = tmp_path / "mine.py"
    model.write_text(MODEL_FILE.format(only_mine=only_mine))
    ckpt = tmp_path / "mine.pth"
    torch.manual_seed(0)
    torch.save({"fc.weight": torch.randn(8, 6), "fc.bias": torch.zeros(8)}, ckpt)
    result = CliRunner().invoke(app, ["audit", str(ckpt), "--model", f"{model}:build", "--input-shape", "4,6", *extra])
    return result.exit_code, result.stdout, result.stderr


def test_cli_exits_2_in_one_line_when_nothing_was_measured(tmp_path: Path) -> None:
    code, out, err = _cli(tmp_path, True, "--max-dead", "0")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "no activation site was measured" in err and "MyAct" in err


def test_cli_exits_2_in_one_line_for_a_select_matching_nothing(tmp_path: Path) -> None:
    code, out, err = _cli(tmp_path, False, "--select", "nope*", "--max-dead", "0")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "'nope*'" in err and "relu" in err
    code, out, err = _cli(tmp_path, False, "--format", "json")
    assert code == 0, err
    report = Report.from_dict(json.loads(out))
    assert list(report.sites) == ["relu"] and any("'act' (MyAct)" in w for w in report.warnings)


class Swish(nn.Module):
    """A user's own Swish: the sigmoid inside it is a recognised function, Swish itself is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class AccurateGELU(nn.Module):
    """GELU's tanh form with its constant kept on the module: a tanh inside, GELU outside. Reading the module,
    the expression is not taken as written (`deadneuron.probe.written`): the tanh is measured alone."""

    def __init__(self) -> None:
        super().__init__()
        self.c = math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(self.c * (x + 0.044715 * x.pow(3))))


class LinearInto(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = act
        with torch.no_grad():
            self.fc.bias[3] = 50.0  # channel 3 always far out on the linear side: alive, gradient 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class LeCunAct(nn.Module):
    """LeCun's scaled tanh with a leak (never flat), its scale kept on the module: the tanh is measured alone."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.7159

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(x * 2 / 3) + 0.1 * x


@pytest.mark.parametrize("act", [LeCunAct(), AccurateGELU()], ids=["lecun", "accurate-gelu"])
def test_an_unknown_module_measured_only_through_another_function_inside_is_named(act: nn.Module) -> None:
    model = LinearInto(act).eval()
    batches = _batches(2)
    z = model.fc(torch.cat(batches)).detach().requires_grad_(True)
    (slope,) = torch.autograd.grad(act(z).sum(), z)  # the oracle: the module's own derivative per element
    assert (slope[:, 3] >= 0.1 - 1e-6).all()  # channel 3 passes its gradient
    report = deadneuron.audit(model, batches, progress=False)
    (inner,) = report.sites.values()  # the function inside, with its own flat region, not the module's
    assert 3 in inner.dead_channels  # ... so the channel the module passes whole looks dead there
    cls = type(act).__name__
    named = [w for w in report.meta["warnings"] if "'act'" in w and f"({cls})" in w]
    assert len(named) == 1 and inner.kind in named[0] and f"register_activation({cls}" in named[0]
    with deadneuron.register_activation(type(act), lambda t: act(t)):
        fixed = deadneuron.audit(model, batches, progress=False)
    assert fixed.meta["warnings"] == [] and 3 not in fixed.sites["act"].dead_channels


def test_a_users_swish_is_measured_as_the_silu_it_writes_and_still_named() -> None:
    """``x * torch.sigmoid(x)`` inside is SiLU (`deadneuron.probe.composite`): the channel far out on the linear
    side is alive; the class is still named, its name not being the function's."""
    model = LinearInto(Swish()).eval()
    report = deadneuron.audit(model, _batches(2), progress=False)
    (inner,) = report.sites.values()
    assert inner.kind == "silu" and 3 not in inner.dead_channels
    assert [w for w in report.meta["warnings"] if "'act' (Swish)" in w and "silu()" in w]


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return a * F.silu(b)


class MishActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x)


@pytest.mark.parametrize("act", [SwiGLU(), MishActivation(), GELUActivation()], ids=["swiglu", "mish", "gelu"])
def test_a_module_named_for_the_function_inside_or_a_gated_unit_gives_no_warning(act: nn.Module) -> None:
    report = deadneuron.audit(LinearInto(act).eval(), _batches(1), progress=False)
    assert len(report.sites) == 1 and report.meta["warnings"] == []


class HoldsUnused(nn.Module):
    """Builds an activation module of its own kind and never calls it (Hugging Face's Mamba mixer keeps an ``act``
    its forward does not use): named, and said not to have been called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.unused, self.used = nn.Linear(6, 8), MyAct(), MyAct()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.used(self.fc(x)))


def test_an_unknown_module_never_called_is_named_as_not_called() -> None:
    report = deadneuron.audit(HoldsUnused().eval(), _batches(1), progress=False)
    (unused,) = [w for w in report.meta["warnings"] if "'unused'" in w]
    (used,) = [w for w in report.meta["warnings"] if "'used'" in w]
    assert "not called by these batches" in unused and "not called" not in used
