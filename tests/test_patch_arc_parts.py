"""The bundled ARC model patches what a finding names: per-part activation keys in its config, --select
globs mapped onto them, the sites that will change listed by name, no-op and spilling plans refused
before any training, BATCH_NORM as the add-BatchNorm fix. Tiny configs and budgets (dry runs, 2 steps).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from arc_model.config import ACTIVATION_KEYS, TrainConfig
from arc_model.model import build_model
from deadneuron import audit
from deadneuron.adapters import get_adapter
from deadneuron.checkpoint import atomic_save
from deadneuron.cli import app
from deadneuron.rules import context_from
from deadneuron.rules.normalisation import conv_fed_without_norm

TINY = {"NUM_GRIDS": 16, "BATCH_SIZE": 8, "CHANNELS": 16, "SLOT_DIM": 16, "NUM_SLOTS": 4, "TIMELINE_GRIDS": 8,
        "TIMELINE_EVERY": 100, "LEARNING_RATE": 1e-3, "BATCH_NORM": False}  # fmt: skip
QUICK = ("--max-steps", "2", "--audit-grids", "8", "--threads", "1", "--no-progress")
# Which modules each key builds, read off the model's own attributes (the oracle for the config).
PART_MODULES = {
    "ACTIVATION": lambda m: [m.encoder.relu],
    "ENCODER_MLP_ACTIVATION": lambda m: [m.encoder.mlp[1]],
    "SLOT_MLP_ACTIVATION": lambda m: [m.slot_attention.mlp[1]],
    "DECODER_ACTIVATION": lambda m: [m.decoder.layers[i] for i in (1, 3, 5)],
}


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def make(path: Path, **config: Any) -> Path:
    torch.set_num_threads(1)
    atomic_save(get_adapter("arc-slot").train({**TINY, **config}, max_steps=1, progress=False), path)
    return path


@pytest.fixture(scope="module")
def sick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make(tmp_path_factory.mktemp("arc") / "sick.pth")


@pytest.fixture(scope="module")
def sites(sick: Path) -> dict[str, Any]:
    """Every site of the tiny model, from an audit of the checkpoint (the oracle for names and kinds)."""
    adapter = get_adapter("arc-slot")
    ckpt = torch.load(sick, weights_only=True)
    config = ckpt["config"]
    report = audit(adapter.load(ckpt), adapter.batches("heldout", config, max_grids=8), adapter=adapter, progress=False,
                   compile=False)  # fmt: skip
    return dict(report.sites)


def listed_sites(stderr: str) -> list[str]:
    match = re.search(r"sites that will change \((\d+)\): (.*)", stderr)
    assert match, stderr
    names = match.group(2).split(", ")
    assert len(names) == int(match.group(1))
    return names


def config_change_lines(stderr: str) -> list[str]:
    block = stderr.split("config changes:\n", 1)[1]
    return [line.strip() for line in block.splitlines() if line.startswith("  ") and not line.startswith("  model:")]


@pytest.mark.parametrize("key", ACTIVATION_KEYS)
def test_each_activation_key_builds_its_own_part_only(key: str) -> None:
    model = build_model(TrainConfig(**{key: "gelu"}))  # type: ignore[arg-type]
    for other, modules in PART_MODULES.items():
        expected = nn.GELU if other == key else nn.ReLU
        assert all(type(m) is expected for m in modules(model)), other


def test_an_old_config_without_the_new_keys_builds_the_same_model() -> None:
    old = {k: v for k, v in TrainConfig(ACTIVATION="leaky").to_dict().items() if k not in ACTIVATION_KEYS[1:]}
    torch.manual_seed(0)
    reference = build_model(TrainConfig(ACTIVATION="leaky"))
    torch.manual_seed(0)
    rebuilt = build_model(TrainConfig.from_dict(old))
    assert reference.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), rebuilt.state_dict().values(), strict=True))
    assert isinstance(rebuilt.encoder.relu, nn.LeakyReLU) and isinstance(rebuilt.decoder.layers[1], nn.ReLU)
    with pytest.raises(ValueError, match="DECODER_ACTIVATION='tanh' is not one of"):
        TrainConfig(DECODER_ACTIVATION="tanh")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("glob", "key"),
    [
        ("decoder.*", "DECODER_ACTIVATION"),
        ("decoder.layers.*", "DECODER_ACTIVATION"),
        ("slot_attention.mlp.0>relu*", "SLOT_MLP_ACTIVATION"),
        ("encoder.mlp.1", "ENCODER_MLP_ACTIVATION"),
        ("encoder.bn_layers.*>relu", "ACTIVATION"),
    ],
)
def test_dry_run_maps_a_select_glob_onto_its_key_and_lists_exactly_its_sites(
    sick: Path, sites: Mapping[str, Any], glob: str, key: str, tmp_path: Path
) -> None:
    code, _, stderr = run("patch", sick, "--activation", "leaky", "--select", glob, "--dry-run", *QUICK)
    assert code == 0, stderr
    assert config_change_lines(stderr) == [f"{key}: relu -> leaky"]
    expected = [name for name, s in sites.items() if fnmatchcase(name, glob) or fnmatchcase(s.module, glob)]
    assert expected and listed_sites(stderr) == expected
    assert list(tmp_path.iterdir()) == [] and "dry run: nothing trained, nothing written" in stderr


def test_select_decoder_retrains_with_only_the_decoder_changed(sick: Path, tmp_path: Path) -> None:
    out = tmp_path / "decoder.pth"
    code, _, stderr = run("patch", sick, "--activation", "leaky", "--select", "decoder.*", "--seeds", "2", "--out", out,
                          *QUICK)  # fmt: skip
    assert code == 0, stderr
    before = torch.load(sick, weights_only=True)["config"]
    saved = torch.load(out, weights_only=True)
    assert {k for k in saved["config"] if saved["config"][k] != before[k]} == {"DECODER_ACTIVATION"}
    rows = saved["patch"]["verification"]["rows"]
    assert all(len(r["baseline"]) == len(r["patched"]) == 2 for r in rows), "--seeds 2: two runs per arm"
    adapter = get_adapter("arc-slot")
    report = audit(adapter.load(saved), adapter.batches("heldout", saved["config"], max_grids=8), adapter=adapter,
                   progress=False, compile=False)  # fmt: skip
    kinds = {name: s.kind for name, s in report.sites.items()}
    assert {n for n, k in kinds.items() if k == "leaky_relu"} == {n for n in kinds if n.startswith("decoder.")}


def test_a_plan_that_changes_nothing_is_refused_before_training(tmp_path: Path) -> None:
    leaky = make(tmp_path / "leaky.pth", DECODER_ACTIVATION="leaky")
    code, _, stderr = run("patch", leaky, "--activation", "leaky", "--select", "decoder.*", *QUICK)
    assert code == 2
    (line,) = [x for x in stderr.splitlines() if x.startswith("deadneuron: error")]
    assert "changes nothing" in line and "DECODER_ACTIVATION already is leaky" in line
    assert "training the" not in stderr and not (tmp_path / "leaky_patched.pth").exists()


def test_a_shared_slope_reaching_unselected_sites_is_refused(tmp_path: Path) -> None:
    leaky = make(tmp_path / "leaky.pth", DECODER_ACTIVATION="leaky")
    code, _, stderr = run("patch", leaky, "--activation", "leaky", "--negative-slope", "0.2", "--select",
                          "encoder.mlp.1", "--dry-run", *QUICK)  # fmt: skip
    assert code == 2 and "also reaches decoder.layers.1, decoder.layers.3, decoder.layers.5" in stderr


def test_a_select_glob_outside_the_configurable_parts_is_refused(sick: Path) -> None:
    code, _, stderr = run("patch", sick, "--activation", "leaky", "--select", "no_such_site*", "--dry-run", *QUICK)
    assert code == 2 and "--select 'no_such_site*' matched no site of this model" in stderr
    code, _, stderr = run("patch", sick, "--add-batchnorm", "--select", "decoder.*", "--dry-run", *QUICK)
    assert code == 2 and "normalisation is not set by the config (only BATCH_NORM can be patched)" in stderr


def test_add_batchnorm_sets_the_switch_and_lists_the_encoder_sites(sick: Path, sites: Mapping[str, Any], tmp_path: Path) -> None:
    code, _, stderr = run("patch", sick, "--add-batchnorm", "--dry-run", *QUICK)
    assert code == 0, stderr
    assert config_change_lines(stderr) == ["BATCH_NORM: False -> True"]
    assert listed_sites(stderr) == [n for n, s in sites.items() if s.module == "encoder.relu"]
    healthy = make(tmp_path / "healthy.pth", BATCH_NORM=True)
    code, _, stderr = run("patch", healthy, "--add-batchnorm", "--dry-run", *QUICK)
    assert code == 2 and "BATCH_NORM already is True" in stderr


def test_the_encoder_sites_read_as_conv_fed_without_norm_only_with_batchnorm_off(sick: Path, tmp_path: Path,
                                                                                 sites: Mapping[str, Any]) -> None:  # fmt: skip
    adapter = get_adapter("arc-slot")
    for path, off in ((sick, True), (make(tmp_path / "bn.pth", BATCH_NORM=True), False)):
        ckpt = torch.load(path, weights_only=True)
        context = context_from(ckpt, adapter.load(ckpt))
        flagged = {name for name, site in sites.items() if conv_fed_without_norm(site, context)}
        assert flagged == ({n for n in sites if n.startswith("encoder.bn_layers.")} if off else set())
