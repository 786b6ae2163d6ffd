"""deadneuron.testing assertions and the pytest plugin (run through pytester)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deadneuron.report import Report
from deadneuron.testing import AuditCache, assert_healthy, assert_sparsity_below, data_fingerprint

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).parent.parent / "examples" / "test_model_health.py"
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def report_a() -> Report:
    return Report.from_json((GOLDEN / "report_a.json").read_text())


def test_assert_healthy_lists_each_offending_site(report_a: Report) -> None:
    with pytest.raises(AssertionError) as exc:
        assert_healthy(report_a, max_dead_fraction=0.36, max_sparsity=0.74, min_active_slots=3)
    lines = str(exc.value).splitlines()
    assert lines == [
        "checkpoints/slot_attention.pth is not healthy: 3 violated checks",
        "  encoder.bn_layers.1>relu: sparsity 75.3% > max_sparsity 74.0%",
        "  decoder.layers.3: 26 of 64 channels dead (40.6%: 4, 5, 7, 11, 12, 16, 19, 26 and 18 more)"
        " > max_dead_fraction 36.0%",
        "  slots: 1.27 active slots per image (of 7) < min_active_slots 3",
    ]


def test_assert_healthy_returns_the_report_when_it_passes(report_a: Report) -> None:
    # encoder.bn_layers.0>relu is the one site of report A without a dead channel
    assert assert_healthy(report_a, sites=["encoder.bn_layers.0*"]) is report_a


def test_assert_sparsity_below(report_a: Report) -> None:
    assert_sparsity_below(report_a, 0.8)
    with pytest.raises(
        AssertionError,
        match=r"1 violated check\n  encoder.bn_layers.1>relu: sparsity 75.3% > max_sparsity 74.0%$",
    ):
        assert_sparsity_below(report_a, 0.74)


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
HEALTH_TESTS = """
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
"""


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


# -- the cache is keyed on the data ------------------------------------------------------------------
class _Counted(nn.Module):
    """Linear(6, 6) as the identity, then ReLU: channel c is dead exactly where column c is never > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.forwards = 0
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(6))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.act(self.linear(x))


def _dataset(dead: tuple[int, ...], *, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(16, 6, generator=gen).abs() + 0.1 for _ in range(3)]
    for x in batches:
        x[:, list(dead)] *= -1.0  # planted: these columns are negative in every row of every batch
    return batches


def _dead_oracle(batches: list[torch.Tensor]) -> tuple[int, ...]:
    import numpy as np

    x = np.concatenate([b.numpy() for b in batches])
    return tuple(int(c) for c in np.flatnonzero((x <= 0).all(axis=0)))


def test_audit_cache_gives_each_dataset_its_own_report() -> None:
    model, cache = _Counted(), AuditCache()
    data_a, data_b = _dataset((1, 4), seed=0), _dataset((0, 2, 5), seed=1)
    assert _dead_oracle(data_a) == (1, 4) and _dead_oracle(data_b) == (0, 2, 5)
    report_a = cache.audit(model, data_a)
    report_b = cache.audit(model, data_b)
    assert report_a.sites["act"].dead_channels == _dead_oracle(data_a)
    assert report_b.sites["act"].dead_channels == _dead_oracle(data_b)
    assert cache.audits == 2


def test_audit_cache_reuses_the_report_for_the_same_data() -> None:
    model, cache = _Counted(), AuditCache()
    data = _dataset((3,), seed=2)
    first = cache.audit(model, data)
    forwards = model.forwards
    assert forwards >= len(data)
    same_content = [x.clone() for x in data]  # another list, equal tensors: the same data
    assert cache.audit(model, data) is first and cache.audit(model, same_content) is first
    assert model.forwards == forwards and cache.audits == 1
    data[1][0, 0] += 1.0  # one value changed in place: other data
    assert cache.audit(model, data) is not first and cache.audits == 2


def test_audit_cache_never_caches_data_it_cannot_identify() -> None:
    model, cache = _Counted(), AuditCache()
    data = _dataset((2,), seed=3)
    reports = [cache.audit(model, (x for x in data)) for _ in range(2)]  # a generator: read once, then gone
    assert cache.audits == 2 and reports[0] is not reports[1]
    assert model.forwards >= 2 * len(data)
    assert all(r.sites["act"].dead_channels == (2,) for r in reports)


@pytest.mark.parametrize(
    "other",
    [
        lambda b: [{"x": b[0]["x"].clone(), "y": b[0]["y"] + 1}],  # one value in a dict batch
        lambda b: [{"x": b[0]["x"].reshape(2, 6, 4), "y": b[0]["y"]}],  # same bytes, another shape
        lambda b: [{"x": b[0]["x"].double(), "y": b[0]["y"]}],  # same values, another dtype
        lambda b: [{"y": b[0]["y"], "z": b[0]["x"]}],  # another key
        lambda b: [(b[0]["x"], b[0]["y"])],  # a tuple, not a dict
        lambda b: [*b, *b],  # one more batch
    ],
    ids=["value", "shape", "dtype", "key", "structure", "length"],
)
def test_data_fingerprint_tells_datasets_apart(other: Any) -> None:
    batches = [{"x": torch.arange(48.0).reshape(4, 6, 2), "y": torch.tensor([1, 2, 3, 4])}]
    copy = [{"x": batches[0]["x"].clone(), "y": batches[0]["y"].clone()}]
    assert data_fingerprint(batches) == data_fingerprint(copy) is not None
    assert data_fingerprint(other(batches)) != data_fingerprint(batches)


def test_data_fingerprint_reads_only_the_audited_batches_and_refuses_what_it_cannot_read() -> None:
    data = _dataset((), seed=4)
    assert data_fingerprint(data, max_batches=2) == data_fingerprint(data[:2]) != data_fingerprint(data)
    assert data_fingerprint(iter(data)) is None
    assert data_fingerprint([object()]) is None
    assert data_fingerprint([torch.eye(3).to_sparse()]) is None


CACHE_TESTS = """
import torch
from torch import nn

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
with torch.no_grad():
    MODEL[0].weight.copy_(torch.eye(6))
    MODEL[0].bias.zero_()

def dataset(dead):
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(5)).abs() + 0.1
    x[:, list(dead)] *= -1.0
    return [x]

def test_first_dataset(activation_audit):
    assert activation_audit(MODEL, dataset((1, 4))).sites["1"].dead_channels == (1, 4)

def test_second_dataset(activation_audit):
    assert activation_audit(MODEL, dataset((0, 3))).sites["1"].dead_channels == (0, 3)

def test_first_again_is_cached(activation_audit, deadneuron_audit_cache):
    assert activation_audit(MODEL, dataset((1, 4))).sites["1"].dead_channels == (1, 4)
    assert deadneuron_audit_cache.audits == 2
"""


def test_plugin_fixture_audits_one_model_on_two_datasets(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_cache=CACHE_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


class _NaNChannel(nn.Module):
    """Channel 2 of the ReLU's input is NaN on every sample; the model keeps its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.outputs: list[torch.Tensor] = []
        with torch.no_grad():
            self.fc.bias.fill_(10.0)  # every other channel alive on any sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).clone()
        h[:, 2] = float("nan")
        out = self.act(h)
        self.outputs.append(out.detach().clone())
        return out


def test_assert_healthy_fails_on_non_finite_activations_by_default() -> None:
    torch.manual_seed(0)
    model, batches = _NaNChannel().eval(), [torch.randn(5, 4)]
    with pytest.raises(AssertionError, match=r"act: 5 non-finite activations .*channel 2"):
        assert_healthy(model, batches)
    nonfinite = int((~torch.isfinite(model.outputs[0])).sum())
    assert nonfinite == 5  # the oracle: the model's own output
    report = assert_healthy(model, batches, max_nonfinite=None)  # opted out: dead channels only
    assert report.sites["act"].dead_channels == ()
