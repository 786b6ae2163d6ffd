"""Truth on every layout (issue 11): each zoo model's audit equals an independent oracle, or says it cannot.

The oracle (tests/zoo_truth.py) reads the z and a each model stored from inside its own forward, on the
channel axis its author knows, with padding excluded where the model was fed an attention mask; nothing
of deadneuron is used to compute it. Sites are found by the module that ran them (SiteHealth.module)
and their kind, not by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.errors import UsageError
from tests import zoo_truth as zt
from tests import zoo_truth_models as zm

MODELS = Path(zm.__file__).resolve()
DERIVED = ("producer", "traced")
PADDED = [name for name, case in zm.ZOO.items() if case.padded]
UNKNOWN = ["hardsigmoid-module", "softsign-module", "rrelu-eval-module", "custom-module-clamp",
           "functional-clamp-min-0", "functional-hardsigmoid"]  # fmt: skip
NONFINITE = ["plus-inf-channel-relu", "minus-inf-channel-leaky", "nan-channel-relu"]
LOW_PRECISION = ["fp16-conv1d-relu-prelu", "bf16-conv1d-relu-prelu"]
KERNELS = pytest.mark.parametrize("compile", [True, False], ids=["fast-kernels", "eager"])


def audit(model: torch.nn.Module, data: Any, **kwargs: Any) -> deadneuron.Report:
    return deadneuron.audit(model, data, progress=False, **kwargs)


def find(report: deadneuron.Report, site: zt.Site) -> deadneuron.SiteHealth:
    hits = [s for s in report.sites.values()
            if s.module == site.module and (site.report_kind is None or s.kind == site.report_kind)]  # fmt: skip
    assert len(hits) > site.index, f"no site #{site.index} of module {site.module!r} ({site.report_kind}) in {list(report.sites)}"
    return hits[site.index]


def counts(fractions: Any, n: int) -> np.ndarray:
    return np.rint(np.asarray(fractions, dtype=np.float64) * n).astype(np.int64)


def checked(model: zt.Net) -> list[tuple[str, zt.Site]]:
    """The sites whose figures the generic test checks: recognised kinds on a knowable axis."""
    return [(tag, s) for tag, s in model.sites.items() if s.recognised and s.axis_known]


def assert_matches(got: deadneuron.SiteHealth, want: zt.Truth, site: zt.Site, where: str) -> None:
    assert got.channels == want.channels, f"{where}: {got.channels} channels, the model has {want.channels}"
    assert got.channel_axis == want.axis, f"{where}: channel axis"
    assert got.n == want.n, f"{where}: n"
    np.testing.assert_array_equal(counts(got.channel_zero, got.n), want.zero, err_msg=f"{where}: zero")
    np.testing.assert_array_equal(np.asarray(got.channel_nonfinite), want.nonfinite, err_msg=f"{where}: nonfinite")
    flat = counts(got.channel_flat, got.n)
    if site.kind in zt.EXACT_KINDS:
        np.testing.assert_array_equal(flat, want.flat, err_msg=f"{where}: flat")
    else:  # a smooth threshold the product derives on a grid: elements next to it may fall either side
        assert np.abs(flat - want.flat).max() <= max(2, 0.01 * want.n), f"{where}: flat {flat} vs {want.flat}"
    assert tuple(got.dead_channels) == want.dead, f"{where}: dead"
    assert tuple(got.dormant_channels) == want.dormant, f"{where}: dormant"
    seen = want.nonfinite < want.n
    for stat in ("mean", "std"):
        np.testing.assert_allclose(np.asarray(getattr(got, f"channel_{stat}"))[seen], getattr(want, stat)[seen],
                                   rtol=1e-5, atol=1e-6, err_msg=f"{where}: {stat}")  # fmt: skip
    for stat in ("min", "max"):
        np.testing.assert_array_equal(np.asarray(getattr(got, f"channel_{stat}"))[seen], getattr(want, stat)[seen],
                                      err_msg=f"{where}: {stat}")  # fmt: skip


# --- the zoo itself (no deadneuron): it plants what it claims, and a misread axis shows ---------------

def test_the_zoo_has_at_least_25_models() -> None:
    assert len(zm.ZOO) >= 25


@pytest.mark.parametrize("case", list(zm.ZOO))
def test_the_oracle_finds_exactly_the_planted_dead_and_dormant_channels(case: str) -> None:
    model, _ = zm.make(case)
    for tag, site in model.sites.items():
        want = zt.truth(model.tap, tag, site)
        assert (want.dead, want.dormant) == (site.planted, site.dormant), tag


@pytest.mark.parametrize("case", [name for name in zm.ZOO if any(s.trap for s in zm.ZOO[name].build().sites.values())])
def test_a_misread_axis_gives_another_answer(case: str) -> None:
    model, _ = zm.make(case)
    for tag, site in model.sites.items():
        if not site.trap:
            continue
        right = zt.truth(model.tap, tag, site)
        naive = zt.naive_axis(model.tap.calls[tag][0][0].ndim)
        assert len({z.shape[right.axis] for z, _, _ in model.tap.calls[tag]}) == 1, tag
        if len({z.shape[naive] for z, _, _ in model.tap.calls[tag]}) > 1:
            continue  # misread, the channel count changes from batch to batch
        wrong = zt.truth(model.tap, tag, site, axis=naive)
        assert (wrong.channels, wrong.dead) != (right.channels, right.dead), tag


@pytest.mark.parametrize("case", PADDED)
def test_counting_padding_gives_another_answer(case: str) -> None:
    model, _ = zm.make(case)
    masked = [zt.truth(model.tap, tag, s).dead for tag, s in model.sites.items()]
    unmasked = [zt.truth(model.tap, tag, s, masked=False).dead for tag, s in model.sites.items()]
    assert masked != unmasked


# --- every zoo model against the oracle ---------------------------------------------------------------

@pytest.mark.parametrize("case", list(zm.ZOO))
def test_site_figures_match_the_oracle(case: str) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches)
    for tag, site in checked(model):
        assert_matches(find(report, site), zt.truth(model.tap, tag, site), site, f"{case}/{tag}")


@pytest.mark.parametrize("case", list(zm.ZOO))
def test_channel_axis_is_derived_where_it_can_be_known(case: str) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches)
    for tag, site in checked(model):
        got = find(report, site)
        assert got.axis_source in DERIVED, f"{tag}: {got.axis_source}"
        assert got.channel_axis == model.tap.axis[tag], tag


# --- masks --------------------------------------------------------------------------------------------

MASKS: dict[str, dict[str, Any]] = {
    "auto": {},
    "key": {"mask": "attention_mask"},
    "callable": {"mask": lambda batch: batch["attention_mask"] > 0},
}


@pytest.mark.parametrize("how", list(MASKS))
@pytest.mark.parametrize("case", PADDED)
def test_padding_is_excluded(case: str, how: str) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches, **MASKS[how])
    for tag, site in model.sites.items():
        got, want = find(report, site), zt.truth(model.tap, tag, site)
        token_site = model.tap.calls[tag][0][2] is not None  # (N, L, C); the pooled head (N, C) is not
        assert got.masked is token_site, tag
        assert got.excluded == want.excluded, tag
        assert_matches(got, want, site, f"{case}/{tag}")


@pytest.mark.parametrize("case", PADDED)
def test_mask_none_counts_padding(case: str) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches, mask=None)
    for tag, site in model.sites.items():
        got = find(report, site)
        assert got.masked is False and got.excluded == 0, tag
        assert_matches(got, zt.truth(model.tap, tag, site, masked=False), site, f"{case}/{tag}")


@pytest.mark.parametrize("case", ["padded-tokens-mlp-gelu", "padded-tokens-mlp-relu"])
def test_masked_statistics_equal_those_of_the_unpadded_data(case: str) -> None:
    model, batches = zm.make(case)
    padded, alone = audit(model, batches), audit(model, zm.unpadded())
    for tag in ("emb", "mlp"):
        site = model.sites[tag]
        a, b = find(padded, site), find(alone, site)
        assert a.n == b.n == zt.truth(model.tap, tag, site).n, tag
        for stat in ("channel_zero", "channel_flat"):
            np.testing.assert_array_equal(counts(getattr(a, stat), a.n), counts(getattr(b, stat), b.n), err_msg=f"{tag}: {stat}")
        assert a.channel_nonfinite == b.channel_nonfinite, tag
        assert (a.dead_channels, a.dormant_channels) == (b.dead_channels, b.dormant_channels) == (site.planted, ()), tag
        for stat in ("channel_mean", "channel_std", "channel_min", "channel_max"):
            np.testing.assert_allclose(getattr(a, stat), getattr(b, stat), rtol=1e-6, atol=1e-7, err_msg=f"{tag}: {stat}")


# --- non-finite values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", NONFINITE)
def test_a_nonfinite_channel_is_counted_and_never_dead(case: str) -> None:
    model, batches = zm.make(case)
    got = find(audit(model, batches), model.sites["act"])
    assert got.channel_nonfinite[1] == got.n
    assert got.nonfinite == got.n
    assert counts(got.channel_flat, got.n)[1] == 0
    assert 1 not in got.dead_channels and 1 not in got.dormant_channels
    assert tuple(got.dead_channels) == (3,)


# --- unknown and registered activations -----------------------------------------------------------------

@pytest.mark.parametrize("case", UNKNOWN)
def test_an_unknown_activation_is_measured_or_named_in_a_warning(case: str) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches)
    site = model.sites["unknown"]
    hits = [s for s in report.sites.values() if s.module == site.module]
    if hits:
        assert len(hits) == 1, [s.name for s in hits]
        assert_matches(hits[0], zt.truth(model.tap, "unknown", site), site, case)
    else:
        warnings = list(report.meta.get("warnings", ()))
        assert any(site.warn in w for w in warnings), f"{site.warn!r} is neither a site nor named in {warnings}"


def clamp_at_zero(z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(z, min=0)


def test_a_registered_module_type_is_a_site_until_removed() -> None:
    model, batches = zm.make("custom-module-clamp")
    site = model.sites["unknown"]
    handle = deadneuron.register_activation(zt.MyAct, clamp_at_zero)
    try:
        report = audit(model, batches)
    finally:
        handle.remove()
    hits = [s for s in report.sites.values() if s.module == "my_act"]
    assert len(hits) == 1, list(report.sites)
    assert_matches(hits[0], zt.truth(model.tap, "unknown", site), site, "my_act")
    assert tuple(hits[0].dead_channels) == site.planted
    # once removed, the registered kind is gone (the clamp inside MyAct is still measured, as a ReLU)
    after = audit(model, batches).sites.values()
    assert not any(s.kind == hits[0].kind for s in after)
    assert [s.kind for s in after if s.module == "my_act"] == ["relu"]


def test_a_registered_function_is_a_site() -> None:
    model, batches = zm.make("functional-hardsigmoid")
    site = model.sites["unknown"]
    handle = deadneuron.register_activation(F.hardsigmoid)
    try:
        report = audit(model, batches)
    finally:
        handle.remove()
    hits = [s for s in report.sites.values() if s.module == site.module]
    assert len(hits) == 1, list(report.sites)
    assert_matches(hits[0], zt.truth(model.tap, "unknown", site), site, "hardsigmoid")
    assert tuple(hits[0].dead_channels) == site.planted


# --- nothing measured is an error -----------------------------------------------------------------------

def test_a_model_without_sites_is_a_usage_error_and_is_left_clean() -> None:
    _, batches = zm.make("linear-relu")
    bare = zm.no_site().train()
    with pytest.raises(UsageError):
        audit(bare, batches)
    assert bare.training and all(m.training for m in bare.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bare.modules())


def test_a_select_that_matches_nothing_is_a_usage_error() -> None:
    model, batches = zm.make("linear-relu")
    assert audit(model, batches, select=["act"]).sites  # the control: a select that matches
    with pytest.raises(UsageError):
        audit(model, batches, select=["no-such-site*"])


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def checkpoint(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return path


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_audit_of_a_model_without_sites_exits_2(tmp_path: Path) -> None:
    args = ["--input-shape", "4,6", "--no-rules", "--format", "json"]
    code, _, err = cli("audit", str(checkpoint(tmp_path, zm.linear_relu())), "--model", f"{MODELS}:linear_relu", *args)
    assert code == 0, err  # the control: the same call on a model with a site
    code, out, err = cli("audit", str(checkpoint(tmp_path, zm.no_site())), "--model", f"{MODELS}:no_site", *args)
    assert code == 2, (out, err)
    assert "site" in one_line(err).lower()


def test_cli_select_that_matches_nothing_exits_2(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path, zm.linear_relu())
    code, out, err = cli("audit", str(ckpt), "--model", f"{MODELS}:linear_relu", "--input-shape", "4,6", "--no-rules",
                         "--select", "no-such-site*")  # fmt: skip
    assert code == 2, (out, err)
    one_line(err)


# --- numerics -----------------------------------------------------------------------------------------

@KERNELS
def test_std_of_channels_with_mean_1e4_is_stable(compile: bool) -> None:
    model, batches = zm.make("mean-1e4-std-1")
    report = audit(model, batches, compile=compile)
    for tag, site in model.sites.items():
        got, want = find(report, site), zt.truth(model.tap, tag, site)
        for c in range(want.channels):
            values = want.values[:, c]  # float64 copies of the float32 activations
            if c in site.planted:
                assert got.channel_mean[c] == 0 and got.channel_std[c] == 0
                continue
            assert values.mean() > 9e3 and 0.5 < values.std() < 2
            assert got.channel_std[c] == pytest.approx(np.std(values), rel=1e-6), (tag, c)
            assert got.channel_mean[c] == pytest.approx(np.mean(values), rel=1e-6), (tag, c)


@KERNELS
@pytest.mark.parametrize("case", LOW_PRECISION)
def test_counts_are_exact_in_low_precision(case: str, compile: bool) -> None:
    model, batches = zm.make(case)
    report = audit(model, batches, compile=compile)
    for tag, site in model.sites.items():
        got, want = find(report, site), zt.truth(model.tap, tag, site)
        assert got.n == want.n, tag
        np.testing.assert_array_equal(counts(got.channel_zero, got.n), want.zero, err_msg=f"{tag}: zero")
        np.testing.assert_array_equal(counts(got.channel_flat, got.n), want.flat, err_msg=f"{tag}: flat")
        assert tuple(got.dead_channels) == want.dead == site.planted, tag


# --- an axis that cannot be known -------------------------------------------------------------------------

def test_an_unknowable_axis_is_reported_as_guessed() -> None:
    model, batches = zm.make("einsum-axis-unknown")
    report = audit(model, batches)
    assert find(report, model.sites["act"]).axis_source == "guessed"
    assert find(report, model.sites["pre"]).axis_source in DERIVED


def test_a_user_channel_axis_matches_the_oracle() -> None:
    model, batches = zm.make("einsum-axis-unknown")
    site = model.sites["act"]
    got = find(audit(model, batches, channel_axis={"act": 1}), site)
    assert got.axis_source == "user"
    assert_matches(got, zt.truth(model.tap, "act", site), site, "act")


def test_cli_channel_axis_flag_matches_the_oracle(tmp_path: Path) -> None:
    model, _ = zm.make("einsum-axis-unknown")
    want = zt.truth(model.tap, "act", model.sites["act"])
    code, out, err = cli("audit", str(checkpoint(tmp_path, model)), "--model", f"{MODELS}:einsum_net",
                         "--data", f"{MODELS}:einsum_batches", "--channel-axis", "act=1", "--no-rules", "--format", "json")  # fmt: skip
    assert code == 0, err
    [got] = [s for s in json.loads(out)["sites"] if s["module"] == "act"]
    assert (got["axis_source"], got["channel_axis"], got["channels"], got["n"]) == ("user", 1, want.channels, want.n)
    assert tuple(got["dead_channels"]) == want.dead == (1, 3)
    np.testing.assert_array_equal(counts(got["channel_flat"], got["n"]), want.flat)


class _InfReLU(torch.nn.Module):
    """Channel 0 of the pre-activation is -inf, channel 1 +inf, channel 2 finite at -5 (dead: flat for
    ReLU, and in Sigmoid's saturated tail z <= -4.4)."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        z = z * torch.tensor([0.0, 0.0, 0.0, 1.0]) + torch.tensor([-float("inf"), float("inf"), -5.0, 0.0])
        return self.act(z)


@pytest.mark.parametrize(
    "act", [torch.nn.ReLU(), torch.nn.ReLU(inplace=True), torch.nn.Sigmoid()], ids=["relu", "relu-inplace", "sigmoid"]
)
def test_an_infinite_preactivation_is_never_flat_even_where_the_output_is_finite(act: torch.nn.Module) -> None:
    # relu(-inf) == 0 and sigmoid(+-inf) is 0 or 1: read on the output, these channels would look dead
    report = audit(_InfReLU(act), [torch.randn(5, 3) for _ in range(2)])
    (site,) = report.sites.values()
    assert site.channel_flat[0] == 0.0 and site.channel_flat[1] == 0.0
    assert 0 not in site.dead_channels and 1 not in site.dead_channels
    assert 2 in site.dead_channels and site.channel_nonfinite[1] == site.n * isinstance(act, torch.nn.ReLU)
