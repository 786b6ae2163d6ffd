"""`deadneuron rules` and the rule options of `deadneuron audit` (--no-rules, --disable, --config)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deadneuron.cli import app
from deadneuron.rules import builtin_rules
from tests.suggested import without_out

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.py"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above: the defaults


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("small_cnn_rules_example", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    mod.make(path)  # channels 3 and 7 of site "5" killed by a BatchNorm bias of -50
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def audit_json(ckpt: Path, *extra: str) -> list[dict[str, object]]:
    code, out, err = run("audit", str(ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{EXAMPLE}:batches",
                         "--format", "json", *extra)
    assert code == 0, err
    return json.loads(out)["findings"]


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_rules_table_lists_every_rule() -> None:
    code, out, err = run("rules")
    assert code == 0, err
    for rule in builtin_rules():
        assert rule.id in out
    assert "min_channels" in out and "warning" in out and "error" in out


def test_rules_json_with_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "rules.toml"
    cfg.write_text("[rules]\ndisable = ['slot-collapse']\n[rules.dead-relu]\nmin_channels = 4\n")
    code, out, err = run("rules", "--format", "json", "--config", str(cfg))
    assert code == 0, err
    rows = {r["id"]: r for r in json.loads(out)}
    assert list(rows) == list(builtin_rules().ids)
    t = {x["name"]: x for x in rows["dead-relu"]["thresholds"]}
    assert (t["min_channels"]["value"], t["min_channels"]["default"]) == (4, 1)
    assert rows["slot-collapse"]["enabled"] is False and rows["nonfinite"]["severity"] == "error"
    assert rows["dead-relu"]["reads"]


def test_rules_bad_format() -> None:
    code, _, err = run("rules", "--format", "yaml")
    assert code == 2 and "table or json" in one_line(err)


def test_audit_attaches_findings_most_severe_first(small_ckpt: Path) -> None:
    findings = audit_json(small_ckpt)
    rules = [f["rule"] for f in findings]
    assert rules == ["dead-relu", "bn-scale-collapse", "sparse-healthy"]
    dead = findings[0]
    assert dead["channels"] == {"5": [3, 7]} and dead["severity"] == "warning"
    subject = f"{small_ckpt} --model {EXAMPLE}:build --data {EXAMPLE}:batches"  # the audit's own subject flags
    assert without_out(dead["commands"][0]) == f"deadneuron patch {subject} --activation leaky --negative-slope 0.01 --select 5"


def test_audit_table_shows_findings_with_commands(small_ckpt: Path) -> None:
    code, out, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{EXAMPLE}:batches")
    assert code == 0, err
    assert "Dead channels at a ReLU site" in out and "Sparse but healthy" in out
    assert out.index("Dead channels at a ReLU site") < out.index("Sparse but healthy")
    assert "--reinit-dead" in out


def test_no_rules_and_disable(small_ckpt: Path) -> None:
    assert audit_json(small_ckpt, "--no-rules") == []
    rules = [f["rule"] for f in audit_json(small_ckpt, "--disable", "dead-relu", "--disable", "sparse-healthy")]
    assert rules == ["bn-scale-collapse"]


def test_config_thresholds_apply(small_ckpt: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "rules.toml"
    cfg.write_text("[rules.dead-relu]\nmin_channels = 3\n[rules.sparse-healthy]\nmin_sparsity = 0.99\n")
    assert [f["rule"] for f in audit_json(small_ckpt, "--config", str(cfg))] == ["bn-scale-collapse"]


def test_bad_rule_options_fail_before_the_audit(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pth"  # never opened: the options are checked first
    code, _, err = run("audit", str(missing), "--disable", "nope")
    assert code == 2 and "valid rules: nonfinite" in one_line(err)
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[rules.dead-relu]\nmin_chanels = 3\n")
    code, _, err = run("audit", str(missing), "--config", str(cfg))
    assert code == 2 and "valid keys: min_channels" in one_line(err)
