"""CLI manners: -h as well as --help everywhere, --version, and every user error as one line with its
documented exit code and no traceback (a device this build cannot use, --data returning no batches, a
factory or data that raises); a --model file may import its neighbours, and a failed import is named."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deadneuron.audit import audit
from deadneuron.cli import app
from deadneuron.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("audit", "patch", "train", "rules", "compare", "report")

FACTORIES = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def batches():
    return [torch.randn(2, 3) for _ in range(2)]


def none():
    return None


def number():
    return 7


def model():
    return build()


def explodes():
    raise RuntimeError("no GPU quota left\\nsecond line of the message")


def lazy():
    yield torch.randn(2, 3)
    raise OSError("shard 2 is missing")


def train(model, steps, seed):
    return model
'''


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with factories.py and tiny.pth; the working folder is elsewhere."""
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "factories.py").write_text(FACTORIES)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), folder / "tiny.pth")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder


def invoke(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv))
    return result.exit_code, result.stdout, result.stderr


def one_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def audit_argv(env: Path, *, model: str = "build", data: str = "batches", extra: tuple[str, ...] = ()) -> list[str]:
    return ["audit", str(env / "tiny.pth"), "--model", f"{env / 'factories.py'}:{model}",
            "--data", f"{env / 'factories.py'}:{data}", "--format", "json", *extra]  # fmt: skip


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help_everywhere(command: str | None) -> None:
    argv = [command] if command else []
    code_h, out_h, _ = invoke(*argv, "-h")
    code_help, out_help, _ = invoke(*argv, "--help")
    assert code_h == code_help == 0
    assert out_h == out_help and out_h.startswith(f"Usage: deadneuron {command or ''}".rstrip())


def test_version_is_the_package_version() -> None:
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    code, out, _ = invoke("--version")
    assert code == 0 and out.strip() == f"deadneuron {expected}"


def test_cuda_on_a_machine_without_it(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = invoke(*audit_argv(env, extra=("--device", "cuda")))
    assert code == 2
    assert one_error(err) == "deadneuron: error: CUDA is not available in this torch build/machine: use --device cpu"


@pytest.mark.parametrize("device", ["foo", "cuda:x", "cpu:0:1"])
def test_a_device_torch_does_not_know(env: Path, device: str) -> None:
    code, _, err = invoke(*audit_argv(env, extra=("--device", device)))
    assert code == 2 and f"--device {device!r} is not a torch device" in one_error(err)


def test_the_api_refuses_the_same_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(UsageError, match="not a torch device"):
        audit(model, [torch.randn(2, 3)], device="foo", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        audit(model, [torch.randn(2, 3)], device="cuda", progress=False)


@pytest.mark.parametrize(("data", "says"), [
    ("none", "returned None: return your batches"),
    ("number", "returned a int, not an iterable of batches"),
    ("model", "returned a model (Sequential), not batches"),
], ids=["none", "not-iterable", "a-model"])  # fmt: skip
def test_data_that_is_not_batches_is_a_usage_error(env: Path, data: str, says: str) -> None:
    code, _, err = invoke(*audit_argv(env, data=data))
    line = one_error(err)
    assert code == 2 and says in line and f"factories.py:{data}'" in line


def test_a_factory_that_raises_is_named_with_the_first_line(env: Path) -> None:
    code, _, err = invoke(*audit_argv(env, model="explodes"))
    line = one_error(err)
    assert code == 6 and "factories.py:explodes' raised RuntimeError: no GPU quota left" in line
    assert "second line" not in line and "factories.py, line" in line


def test_data_that_raises_while_batches_are_drawn(env: Path) -> None:
    code, _, err = invoke(*audit_argv(env, data="lazy"))
    assert code == 6 and "the data raised OSError while producing batch 1: shard 2 is missing" in one_error(err)


def test_a_model_file_imports_its_neighbours_and_sys_path_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "research"
    folder.mkdir()
    neighbour = f"blocks_{tmp_path.name.replace('-', '_')}"
    (folder / f"{neighbour}.py").write_text("from torch import nn\n\n\ndef mlp():\n    return nn.Sequential(nn.Linear(3, 4), nn.ReLU())\n")
    (folder / "model.py").write_text(textwrap.dedent(f"""
        import torch
        from {neighbour} import mlp

        def build():
            torch.manual_seed(0)
            return mlp()

        def batches():
            return [torch.randn(2, 3)]
    """))
    torch.manual_seed(0)
    from importlib import import_module

    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        torch.save(import_module(neighbour).mlp().state_dict(), tmp_path / "m.pth")
    finally:
        sys.path[:] = before
        sys.modules.pop(neighbour, None)
    code, _, err = invoke("audit", "m.pth", "--model", "research/model.py:build", "--data", "research/model.py:batches",
                          "--format", "json")  # fmt: skip
    assert code == 0, err
    assert sys.path == before


def test_a_failed_import_inside_the_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.py").write_text("import torch\nimport not_installed_anywhere_xyz\n\n\ndef build():\n    pass\n")
    torch.save({}, tmp_path / "m.pth")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    code, _, err = invoke("audit", "m.pth", "--model", "model.py:build", "--input-shape", "2,3")
    line = one_error(err)
    assert code == 2 and "import of 'not_installed_anywhere_xyz' failed (model.py, line 2)" in line
    assert sys.path == before


def test_a_missing_module_spec_says_where_to_run_from(env: Path) -> None:
    code, _, err = invoke("audit", str(env / "tiny.pth"), "--model", "no_such_pkg_xyz.models:build", "--input-shape", "2,3")
    assert code == 2 and "cannot import 'no_such_pkg_xyz'" in one_error(err)


def test_train_is_checked_and_carried_into_the_commands(env: Path) -> None:
    code, _, err = invoke(*audit_argv(env, extra=("--train", f"{env / 'factories.py'}:nope", "--max-steps", "3")))
    assert code == 2 and "has no attribute 'nope'" in one_error(err)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[:2] = -1e3  # two dead channels at the ReLU
    torch.save(model.state_dict(), env / "tiny.pth")
    import json

    code, _, err = invoke(*audit_argv(env, extra=("--train", f"{env / 'factories.py'}:train")))
    assert code == 2 and "add --max-steps N" in one_error(err)  # the commands retrain on a budget
    code, out, err = invoke(*audit_argv(env, extra=("--train", f"{env / 'factories.py'}:train", "--max-steps", "3")))
    assert code == 0, err
    commands = [c for f in json.loads(out)["findings"] for c in f["commands"]]
    assert commands and all(f"--train {env / 'factories.py'}:train --max-steps 3" in c for c in commands)
