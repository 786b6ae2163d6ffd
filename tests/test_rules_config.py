"""Thresholds: defaults, then [tool.deadneuron.rules] in the nearest pyproject.toml, then --config, then
flags; unknown keys and bad values are one-line UsageErrors that list what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from deadneuron.errors import UnreadableInputError, UsageError
from deadneuron.rules import builtin_rules, parse_overrides
from deadneuron.settings import load_config

RULES = builtin_rules()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def dead_relu(config: object) -> dict[str, float]:
    return config.thresholds_for(RULES.get("dead-relu"))  # type: ignore[attr-defined]


def test_defaults_without_any_pyproject(tmp_path: Path) -> None:
    config = load_config(rules=RULES, cwd=tmp_path)  # tmp_path has no pyproject.toml above it
    assert dead_relu(config) == {"min_channels": 1, "min_fraction": 0.05, "negative_slope": 0.01}
    assert not config.disabled and config.enabled


def test_nearest_pyproject_upwards_from_cwd(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", """
[tool.deadneuron.rules]
disable = ["sparse-healthy"]

[tool.deadneuron.rules.dead-relu]
min_channels = 3
""")
    deep = tmp_path / "src" / "pkg"
    deep.mkdir(parents=True)
    config = load_config(rules=RULES, cwd=deep)
    assert dead_relu(config)["min_channels"] == 3
    assert config.disabled == {"sparse-healthy"}
    assert any("pyproject.toml" in s for s in config.sources)


def test_the_nearest_pyproject_is_the_project_even_without_a_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.deadneuron.rules.dead-relu]\nmin_channels = 3\n")
    write(tmp_path / "inner" / "pyproject.toml", "[project]\nname = 'inner'\n")
    assert dead_relu(load_config(rules=RULES, cwd=tmp_path / "inner"))["min_channels"] == 1


def test_layers_override_in_order(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", """
[tool.deadneuron.rules.dead-relu]
min_channels = 3
min_fraction = 0.1
""")
    cfg_file = write(tmp_path / "rules.toml", "[rules.dead-relu]\nmin_channels = 5\n")
    config = load_config(rules=RULES, cwd=tmp_path, config_file=cfg_file, disable=["slot-collapse"],
                         overrides=["dead-relu.min_fraction=0.5"])
    assert dead_relu(config) == {"min_channels": 5, "min_fraction": 0.5, "negative_slope": 0.01}
    assert config.disabled == {"slot-collapse"}


def test_config_file_may_be_a_pyproject(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "other" / "pyproject.toml", "[tool.deadneuron.rules.dead-relu]\nmin_channels = 4\n")
    assert dead_relu(load_config(rules=RULES, cwd=tmp_path, config_file=cfg_file))["min_channels"] == 4


def test_other_features_keys_in_tool_deadneuron_are_left_alone(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.deadneuron]\nmax_dead = 0\n[tool.deadneuron.gate]\nsites = ['x']\n")
    assert dead_relu(load_config(rules=RULES, cwd=tmp_path))["min_channels"] == 1


@pytest.mark.parametrize(("text", "match"), [
    pytest.param("[tool.deadneuron.rules]\ndead_relu = {min_channels = 2}\n", "unknown key 'dead_relu'.*valid keys: disable, nonfinite", id="unknown-rule"),
    pytest.param("[tool.deadneuron.rules.dead-relu]\nmin_chanels = 2\n", "unknown threshold 'min_chanels'; valid keys: min_channels, min_fraction, negative_slope", id="unknown-threshold"),
    pytest.param("[tool.deadneuron.rules]\ndisable = ['dead-rleu']\n", "unknown rule 'dead-rleu'; valid rules: nonfinite", id="unknown-disable"),
    pytest.param("[tool.deadneuron.rules.dead-relu]\nmin_channels = 'two'\n", "min_channels must be an integer, got 'two'", id="string"),
    pytest.param("[tool.deadneuron.rules.dead-relu]\nmin_channels = 1.5\n", "min_channels must be an integer", id="non-integer"),
    pytest.param("[tool.deadneuron.rules.dead-relu]\nmin_fraction = true\n", "min_fraction must be a number", id="bool"),
    pytest.param("[tool.deadneuron.rules.dead-relu]\nmin_fraction = 1.5\n", r"min_fraction must be in \[0, 1\]", id="range"),
    pytest.param("[tool.deadneuron.rules]\ndead-relu = 3\n", "expected a table of thresholds", id="not-a-table"),
    pytest.param("[tool.deadneuron]\nrules = 3\n", "'rules' must be a table", id="rules-not-a-table"),
    pytest.param("[tool.deadneuron]\ndisable = ['dead-relu']\n", r"must go under the rules table", id="misplaced-disable"),
    pytest.param("[tool.deadneuron.dead-relu]\nmin_channels = 2\n", r"dead-relu must go under the rules table", id="misplaced-rule"),
    pytest.param("[tool.deadneuron\n", "is not valid TOML", id="bad-toml"),
])
def test_bad_pyproject_is_a_clear_usage_error(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path / "pyproject.toml", text)
    with pytest.raises(UsageError, match=match) as info:
        load_config(rules=RULES, cwd=tmp_path)
    assert "\n" not in str(info.value)
    if "TOML" not in match:
        assert str(path) in str(info.value)


def test_bad_config_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableInputError, match=f"--config {tmp_path / 'nope.toml'}: no such file"):
        load_config(rules=RULES, cwd=tmp_path, config_file=tmp_path / "nope.toml")
    cfg = write(tmp_path / "c.toml", "[tool.black]\nline-length = 1\n")
    with pytest.raises(UsageError, match=r"no \[tool\.deadneuron\] table"):
        load_config(rules=RULES, cwd=tmp_path, config_file=cfg)
    cfg = write(tmp_path / "d.toml", "[rules.nope]\nx = 1\n")
    with pytest.raises(UsageError, match=f"--config {cfg}: unknown key 'nope'"):
        load_config(rules=RULES, cwd=tmp_path, config_file=cfg)


def test_bad_flags(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--disable: unknown rule 'nope'; valid rules: "):
        load_config(rules=RULES, cwd=tmp_path, disable=["nope"])
    with pytest.raises(UsageError, match=r"RULE\.THRESHOLD=VALUE"):
        parse_overrides(["dead-relu=2"], rules=RULES)
    with pytest.raises(UsageError, match="unknown threshold 'x'"):
        parse_overrides(["dead-relu.x=2"], rules=RULES)
