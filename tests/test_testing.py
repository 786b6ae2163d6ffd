"""deadneuron.testing assertions and the pytest plugin (run through pytester)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deadneuron.report import Report
from deadneuron.testing import AuditCache, assert_healthy, assert_sparsity_below

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).parent.parent / "examples" / "test_model_health.py"
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def report_a() -> Report:
    return Report.from_json((GOLDEN / "report_a.json").read_text())


def test_assert_healthy_lists_each_offending_site(report_a: Report) -> None:
    with pytest.raises(AssertionError) as exc:
        assert_healthy(report_a, max_dead_fraction=0.3, max_sparsity=0.8, min_active_slots=2)
    lines = str(exc.value).splitlines()
    assert lines == [
        "checkpoints/slot_attention.pth is not healthy: 3 violated checks",
        "  encoder.bn_layers.2>relu: 3 of 8 channels dead (37.5%: 0, 1, 4) > max_dead_fraction 30.0%",
        "  encoder.bn_layers.2>relu: sparsity 81.2% > max_sparsity 80.0%",
        "  slots: 1.60 active slots per image (of 7) < min_active_slots 2",
    ]


def test_assert_healthy_returns_the_report_when_it_passes(report_a: Report) -> None:
    assert assert_healthy(report_a, sites=["encoder.bn_layers.0*", "decoder.*"]) is report_a


def test_assert_sparsity_below(report_a: Report) -> None:
    assert_sparsity_below(report_a, 0.9)
    with pytest.raises(AssertionError, match=r"encoder.bn_layers.1>relu: sparsity 74.3% > max_sparsity 70.0%"):
        assert_sparsity_below(report_a, 0.7)


def test_assert_sparsity_below_audits_a_model() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    data = [torch.randn(32, 4, generator=torch.Generator().manual_seed(0))]
    report = assert_sparsity_below(model, 0.9, data=data)
    assert list(report.sites) == ["1"]
    with pytest.raises(AssertionError, match=r"^Sequential is too sparse: 1 violated check\n  1: sparsity"):
        assert_sparsity_below(model, 0.01, data=data)


def test_bad_arguments_say_what_to_do(report_a: Report) -> None:
    with pytest.raises(TypeError, match="needs data"):
        assert_healthy(nn.ReLU())
    with pytest.raises(TypeError, match=r"expected an nn\.Module or a deadneuron Report"):
        assert_healthy("model.pth")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="only with a model"):
        assert_healthy(report_a, [torch.zeros(1)])


def test_audit_cache_audits_a_model_once_per_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(0))]
    cache = AuditCache(report_dir=tmp_path / "kept")
    first = cache.audit(model, data, test_id="tests/x.py::test_a")
    assert cache.audit(model, data) is first and cache.audits == 1
    with torch.no_grad():
        model[0].bias.add_(1.0)  # trained in between: a fresh audit
    assert cache.audit(model, data) is not first and cache.audits == 2
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
        "Sequential.json", "Sequential.md", "tests_x.py_test_a.json", "tests_x.py_test_a.md",
    ]  # fmt: skip


# -- the plugin, through pytester --------------------------------------------------------------------
HEALTH_TESTS = '''
import torch
from torch import nn
from deadneuron.testing import assert_healthy

def build(dead=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[list(dead)] = -100.0
    return model

DATA = [torch.randn(16, 6, generator=torch.Generator().manual_seed(1))]
MODEL = build()

def test_healthy():
    assert_healthy(build(), DATA)

def test_planted_dead():
    assert_healthy(build(dead=(2, 6)), DATA)

def test_fixture_first(activation_audit):
    assert activation_audit(MODEL, DATA).summary.dead == 0

def test_fixture_cached(activation_audit, deadneuron_audit_cache):
    activation_audit(MODEL, DATA)
    assert deadneuron_audit_cache.audits == 1
'''


def test_plugin_passing_and_failing_assertions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_health=HEALTH_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--deadneuron-report-dir", "kept")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*AssertionError: Sequential is not healthy: 1 violated check",
        "*  1: 2 of 8 channels dead (25.0%: 2, 6) > max_dead_fraction 0.0%",
    ])  # fmt: skip
    kept = sorted(p.name for p in (pytester.path / "kept").iterdir())
    assert kept == ["test_health.py_test_fixture_first.json", "test_health.py_test_fixture_first.md"]


def test_plugin_registers_its_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["*--deadneuron-report-dir=DIR*"])


def test_the_example_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_model_health=EXAMPLE.read_text())
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, xfailed=1)
