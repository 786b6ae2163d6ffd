"""Health gates: the pure checks (deadneuron.gate) and `deadneuron audit --max-*` exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from deadneuron.errors import UsageError
from deadneuron.gate import GateLimits, check, failure_message, scoped_sites
from deadneuron.report import Report

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).parent.parent
SMALL_CNN = ROOT / "examples" / "small_cnn.py"


# the sites of golden report A with a dead channel: all but encoder.bn_layers.0>relu
DEAD_SITES = [
    "encoder.bn_layers.1>relu", "encoder.bn_layers.2>relu", "encoder.bn_layers.3>relu", "encoder.mlp.1",
    "slot_attention.mlp.0>relu#0", "slot_attention.mlp.0>relu#1", "slot_attention.mlp.0>relu#2",
    "decoder.layers.1", "decoder.layers.3", "decoder.layers.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def report_a() -> Report:
    return Report.from_json((GOLDEN / "report_a.json").read_text())


def test_no_limits_passes(report_a: Report) -> None:
    assert check(report_a, GateLimits()) == ()


@pytest.mark.parametrize(
    ("limits", "sites"),
    [
        pytest.param(GateLimits(max_dead=0), DEAD_SITES, id="max-dead-0"),
        pytest.param(
            GateLimits(max_dead=15),  # encoder.bn_layers.3>relu has exactly 15: not over the limit
            ["slot_attention.mlp.0>relu#0", "decoder.layers.3", "decoder.layers.5"],
            id="max-dead-15",
        ),
        pytest.param(GateLimits(max_dead=26), [], id="max-dead-26"),
        pytest.param(
            GateLimits(max_dead_fraction=0.2),  # encoder.bn_layers.2>relu and decoder.layers.1 have 10/64 = 15.6%
            ["encoder.bn_layers.1>relu", "encoder.bn_layers.3>relu", "decoder.layers.3", "decoder.layers.5"],
            id="dead-fraction",
        ),
        pytest.param(
            GateLimits(max_sparsity=0.65), ["encoder.bn_layers.1>relu", "encoder.bn_layers.3>relu", "decoder.layers.3"],
            id="sparsity",
        ),
        pytest.param(
            GateLimits(max_dead=0, sites=("encoder.bn_layers.2*",)), ["encoder.bn_layers.2>relu"], id="scoped"
        ),
        pytest.param(GateLimits(max_dead=0, sites=("encoder.bn_layers.0*",)), [], id="scoped-healthy"),
    ],
)
def test_site_checks_list_every_offending_site(
    report_a: Report, limits: GateLimits, sites: list[str]
) -> None:
    assert [v.site for v in check(report_a, limits)] == sites


def test_every_violated_check_is_listed(report_a: Report) -> None:
    violations = check(report_a, GateLimits(max_dead=14, max_sparsity=0.7, min_active_slots=3))
    assert [(v.check, v.site) for v in violations] == [
        ("max_sparsity", "encoder.bn_layers.1>relu"),
        ("max_dead", "encoder.bn_layers.3>relu"),
        ("max_dead", "slot_attention.mlp.0>relu#0"),
        ("max_dead", "decoder.layers.3"),
        ("max_dead", "decoder.layers.5"),
        ("min_active_slots", "slots"),
    ]
    assert failure_message(violations).splitlines() == [
        "activation health check failed: 6 violated checks",
        "  encoder.bn_layers.1>relu: sparsity 75.3% > max_sparsity 70.0%",
        "  encoder.bn_layers.3>relu: 15 of 64 channels dead (2, 3, 6, 7, 10, 12, 27, 29 and 7 more) > max_dead 14",
        "  slot_attention.mlp.0>relu#0: 16 of 128 channels dead (10, 17, 19, 27, 39, 62, 66, 67 and 8 more) > max_dead 14",
        "  decoder.layers.3: 26 of 64 channels dead (4, 5, 7, 11, 12, 16, 19, 26 and 18 more) > max_dead 14",
        "  decoder.layers.5: 21 of 64 channels dead (0, 1, 3, 12, 16, 17, 18, 19 and 13 more) > max_dead 14",
        "  slots: 1.27 active slots per image (of 7) < min_active_slots 3",
    ]


def test_a_glob_matching_nothing_fails_the_gate(report_a: Report) -> None:
    (v,) = check(report_a, GateLimits(max_dead=10, sites=("encoder.bn_layer.*",)))
    assert v.check == "sites" and "no site matches 'encoder.bn_layer.*'" in str(v)


def test_globs_match_module_names_too(report_a: Report) -> None:
    # encoder.relu is one module that runs after each of the four encoder.bn_layers.N
    assert [s.name for s in scoped_sites(report_a, ["encoder.relu"])] == [
        f"encoder.bn_layers.{i}>relu" for i in range(4)
    ]
    assert [s.name for s in scoped_sites(report_a, ["slot_attention.mlp.[1]"])] == [
        f"slot_attention.mlp.0>relu#{i}" for i in range(3)
    ]


def test_slot_limit_without_slot_measurements_fails(report_a: Report) -> None:
    bare = Report.build(report_a.sites.values())
    (v,) = check(bare, GateLimits(min_active_slots=1))
    assert v.check == "min_active_slots" and "no slot masks" in v.detail


@pytest.mark.parametrize(
    "kwargs",
    [{"max_dead": -1}, {"max_sparsity": 1.5}, {"max_dead_fraction": -0.1}, {"min_active_slots": -2}],
    ids=["dead", "sparsity", "dead-fraction", "slots"],
)
def test_bad_limits_are_usage_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError, match=next(iter(kwargs))):
        GateLimits(**kwargs)  # type: ignore[arg-type]


# -- the CLI gate ------------------------------------------------------------------------------------
def _audit(capsys: pytest.CaptureFixture[str], *gate: str) -> tuple[int, str, str]:
    from deadneuron.cli import main

    argv = ["audit", str(ROOT / "examples" / "small_cnn.pth"), "--model", f"{SMALL_CNN}:build",
            "--data", f"{SMALL_CNN}:batches", "--batches", "2", "--no-progress", *gate]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_cli_gate_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _audit(capsys, "--max-dead", "0", "--max-sparsity", "0.4", "--min-active-slots", "3")
    assert code == 1
    assert "Activation sites" in out  # the report is printed before the verdict
    lines = err.splitlines()
    assert lines[0] == "deadneuron: health gate failed: 4 violated checks"
    assert any(line.startswith("  5: 2 of 16 channels dead (3, 7) > --max-dead 0") for line in lines)  # as typed
    assert sum("--max-sparsity 40.0%" in line for line in lines) == 2
    assert any("--min-active-slots cannot pass" in line for line in lines)


def test_cli_gate_passes_and_scopes(capsys: pytest.CaptureFixture[str]) -> None:
    assert _audit(capsys, "--max-dead", "2")[0] == 0
    code, _, err = _audit(capsys, "--max-dead", "0", "--sites", "2")
    assert (code, err) == (0, "")


def test_cli_gate_rejects_bad_limits(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _audit(capsys, "--max-sparsity", "40")
    assert code == 2 and "--max-sparsity must be a fraction in [0, 1], got 40.0" in err
    code, _, err = _audit(capsys, "--sites", "enc*")
    assert code == 2 and "--sites scopes the gate options" in err
