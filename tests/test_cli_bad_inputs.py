"""Bad inputs through the CLI (issue 7): one exact exit code, one `deadneuron: error:` line, no traceback,
nothing written and the input unchanged, for `audit`, `patch` (mostly `--dry-run`) and `train`.

tests/test_cli_audit.py already runs some of these inputs through `audit`; here they go through the other
commands, and every case also checks that the working folder (the input's, and the cwd) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deadneuron import _sniff
from deadneuron.adapters import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from deadneuron.cli import app
from deadneuron.report import Report

try:
    import fixtures_checkpoints as fx
except ImportError:  # tests/ run as a package
    from tests import fixtures_checkpoints as fx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "small_cnn.py"
DEMO = ROOT / "checkpoints" / "slot_attention.pth"
MODEL = ["--model", f"{EXAMPLE}:build"]
DATA = ["--data", f"{EXAMPLE}:batches"]
TRAIN = ["--config", "NUM_GRIDS=16", "--config", "BATCH_SIZE=8", "--config", "CHANNELS=8", "--threads", "1", "--no-progress"]  # fmt: skip

# Factories the bad-input cases point --model/--data at. They live outside the watched folder: importing
# a file writes its __pycache__ beside it.
FACTORIES = '''
import torch
from torch import nn

def raising():
    raise ValueError("width must be even")

def nothing():
    return []

def head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

def ten_by_ten():
    return [torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))]
'''


@dataclass(frozen=True)
class Env:
    """The watched folder (the input's; also the cwd) and the folder of factory modules."""

    d: Path
    helpers: Path

    def factory(self, name: str) -> str:
        return f"{self.helpers / 'factories.py'}:{name}"


def small_cnn_state(d: Path, name: str = "small.pth") -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_cnn_for_bad_inputs", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(d / name)
    return d / name


def audit(path: Path, env: Env, *extra: str) -> list[str]:
    """An audit that would write its report into the watched folder, had it got that far."""
    return ["audit", str(path), *MODEL, *DATA, "--batches", "1", "--no-rules", "--out", str(env.d / "report"), *extra]


def dry_patch(path: Path, *extra: str) -> list[str]:
    return ["patch", str(path), "--activation", "leaky", "--dry-run", *extra]


# --- the cases: each builds its input in the watched folder and returns the command line --------------


def _truncated(env: Env) -> list[str]:
    data = small_cnn_state(env.d).read_bytes()
    return audit(fx.write(env.d, "small.pth", data[: len(data) // 2]), env)


def _flipped(env: Env) -> list[str]:
    return audit(fx.flip_tensor_byte(small_cnn_state(env.d)), env)


def _saved(build: Callable[[Path], Path]) -> Callable[[Env], list[str]]:
    return lambda env: audit(build(env.d), env)


def _malicious(legacy: bool) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        payload = {"state_dict": fx.tiny_state_dict(), "x": fx.RunsCommand(env.d / "MARKER")}
        return audit(fx.save(env.d, "evil.pth", payload, _use_new_zipfile_serialization=not legacy), env)

    return build


def _unknown_adapter(env: Env) -> list[str]:
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "adapter": "no-such-adapter", "config": {},
            "state_dict": fx.tiny_state_dict()}  # fmt: skip
    return ["audit", str(fx.save(env.d, "other.pth", ckpt)), "--out", str(env.d / "report")]


def _wrong_shape(env: Env) -> list[str]:
    """10x10 inputs through a head sized for 8x8 ones: the conv and its ReLU run, the Linear fails."""
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))  # FACTORIES' head
    path = fx.save(env.d, "head.pth", head.state_dict())
    return dry_patch(path, "--model", env.factory("head"), "--data", env.factory("ten_by_ten"))


def _mismatch(env: Env) -> list[str]:
    return dry_patch(fx.save(env.d, "other.pth", fx.tiny_state_dict()), *MODEL, *DATA)


def _patch_out_is_input(env: Env) -> list[str]:
    path = Path(shutil.copy(DEMO, env.d / "demo.pth"))
    return ["patch", str(path), "--activation", "leaky", "--out", str(path), "--force", "--max-steps", "1"]


def _train_out_exists(env: Env) -> list[str]:
    return ["train", *TRAIN, "--max-steps", "1", "--out", str(fx.write(env.d, "run.pth", b"a previous run"))]


def _under_a_file(command: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        out = str(fx.write(env.d, "file", b"x") / "sub.pth")
        if command == "train":
            return ["train", *TRAIN, "--max-steps", "1", "--out", out]
        return ["patch", str(small_cnn_state(env.d)), "--activation", "leaky", *MODEL, *DATA, "--out", out]

    return build


Case = Callable[[Env], list[str]]
CASES = [
    # audit: damaged, hostile and unsupported files
    pytest.param(_truncated, 4, "corrupt or truncated", id="audit-truncated-zip"),
    pytest.param(_saved(lambda d: fx.write(d, "noise.pth", random.Random(0).randbytes(4096))), 4,
                 "not a PyTorch checkpoint (random bytes?)", id="audit-random-bytes"),  # fmt: skip
    pytest.param(_saved(lambda d: fx.write(d, "zero.pth", b"")), 4, "empty (0 bytes)", id="audit-zero-bytes"),
    pytest.param(_flipped, 4, "CRC-32", id="audit-flipped-tensor-byte"),
    pytest.param(_saved(fx.namespace_checkpoint), 3, "--allow-global argparse.Namespace", id="audit-namespace"),
    pytest.param(_saved(fx.dataclass_checkpoint), 3, "TrainConfig", id="audit-dataclass"),
    pytest.param(_saved(fx.numpy_scalar_checkpoint), 3, "numpy", id="audit-numpy-scalar"),
    pytest.param(_saved(lambda d: fx.zip_with_pickle(d, "deep.pth", fx.deeply_nested_pickle())), 4,
                 "nested more than", id="audit-deeply-nested"),  # fmt: skip
    pytest.param(_malicious(legacy=False), 3, "posix.system", id="audit-os-system-zip"),
    pytest.param(_malicious(legacy=True), 3, "posix.system", id="audit-os-system-legacy"),
    pytest.param(_saved(fx.torchscript_file), 3, "--trust-code", id="audit-torchscript"),
    pytest.param(_saved(lambda d: fx.save(d, "model.pth", fx.tiny_model())), 3, "--trust-code",
                 id="audit-whole-pickled-module"),  # fmt: skip
    pytest.param(_unknown_adapter, 4, "'no-such-adapter', which is not installed", id="audit-unknown-adapter"),
    pytest.param(lambda env: audit(small_cnn_state(env.d), env, "--eps", "-0.001"), 2, "--eps", id="audit-negative-eps"),
    pytest.param(lambda env: audit(small_cnn_state(env.d), env, "--delta", "-0.5"), 2, "--delta",
                 id="audit-negative-delta"),  # fmt: skip
    pytest.param(lambda env: audit(small_cnn_state(env.d), env, "--max-sparsity", "60"), 2,
                 "--max-sparsity must be a fraction in [0, 1], got 60.0", id="audit-gate-percent"),  # fmt: skip
    pytest.param(lambda env: audit(small_cnn_state(env.d), env, "--max-dead", "-1"), 2,
                 "--max-dead must be >= 0", id="audit-gate-negative"),  # fmt: skip
    # patch --dry-run of a plain state_dict: the same loading and model building, another command
    pytest.param(lambda env: dry_patch(env.d / "nope.pth", *MODEL, *DATA), 4, "no such file", id="patch-missing-path"),
    pytest.param(lambda env: dry_patch(env.d, *MODEL, *DATA), 4, "is a folder", id="patch-folder"),
    pytest.param(lambda env: dry_patch(small_cnn_state(env.d), "--model", "no_such_module_xyz:build", *DATA), 2,
                 "'no_such_module_xyz'", id="patch-wrong-model-path"),  # fmt: skip
    pytest.param(lambda env: dry_patch(small_cnn_state(env.d), "--model", env.factory("raising"), *DATA), 6,
                 "ValueError: width must be even", id="patch-factory-raises"),  # fmt: skip
    pytest.param(lambda env: dry_patch(small_cnn_state(env.d), *MODEL, "--input-shape", "8,three"), 2,
                 "--input-shape", id="patch-malformed-input-shape"),  # fmt: skip
    pytest.param(lambda env: dry_patch(small_cnn_state(env.d), *MODEL, "--data", env.factory("nothing")), 2,
                 "no batches", id="patch-data-yields-nothing"),  # fmt: skip
    pytest.param(_wrong_shape, 6, "(2, 3, 10, 10)) after site '1', last module run '2'", id="patch-batches-of-the-wrong-shape"),  # the site table's name,
    pytest.param(lambda env: dry_patch(small_cnn_state(env.d), *MODEL, *DATA, "--batches", "0"), 2, "--batches",
                 id="patch-batches-0"),  # fmt: skip
    pytest.param(_mismatch, 5, "missing", id="patch-state-dict-mismatch"),
    pytest.param(_under_a_file("patch"), 7, "does not exist", id="patch-out-under-a-file"),
    pytest.param(_patch_out_is_input, 2, "never overwritten", id="patch-out-is-the-input"),
    # train
    pytest.param(_train_out_exists, 2, "already exists; pass --force", id="train-out-exists"),
    pytest.param(lambda env: ["train", "--config", "NOT_A_KEY=1", "--out", str(env.d / "x.pth")], 2,
                 "unknown config key", id="train-unknown-config-key"),  # fmt: skip
    pytest.param(_under_a_file("train"), 7, "does not exist", id="train-out-under-a-file"),
    pytest.param(lambda env: ["train", "--resume", str(small_cnn_state(env.d)), "--out", str(env.d / "x.pth")], 2,
                 "not a deadneuron checkpoint", id="train-resume-a-state-dict"),  # fmt: skip
]


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("helpers")
    (folder / "factories.py").write_text(textwrap.dedent(FACTORIES))
    return folder


@pytest.fixture
def env(tmp_path: Path, helpers: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.chdir(tmp_path)  # a stray relative write would land in the watched folder
    return Env(tmp_path, helpers)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with the SHA-256 of its bytes (folders as "dir")."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def invoke(argv: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_error_line(stderr: str, *mentions: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("deadneuron: error: ") and "Traceback" not in stderr
    for text in mentions:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(("case", "code", "says"), CASES)
def test_bad_input_exits_with_its_code_one_line_and_writes_nothing(env: Env, case: Case, code: int, says: str) -> None:
    argv = case(env)
    before = snapshot(env.d)
    exit_code, _, stderr = invoke(argv)
    assert exit_code == code, stderr
    assert_one_error_line(stderr, says)
    assert snapshot(env.d) == before  # no report, no output, no temp file, no MARKER; the input's bytes unchanged


def test_unreadable_file_exits_4(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # We run as root, which reads files whatever their mode: refuse the open instead.
    path = small_cnn_state(env.d)
    before = snapshot(env.d)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_sniff, "open", denied, raising=False)
    code, _, stderr = invoke(audit(path, env))
    assert code == 4
    assert_one_error_line(stderr, str(path), "permission denied")
    assert snapshot(env.d) == before


@pytest.mark.parametrize(
    ("build", "warning"),
    [
        pytest.param(lambda d: small_cnn_state(d, "small.safetensors"), "is not safetensors", id="pth-renamed-safetensors"),
        pytest.param(lambda d: fx.save_as_if_from_cuda(d, "cuda.pth", torch.load(small_cnn_state(d), weights_only=True)),
                     None, id="tensors-saved-from-cuda"),  # fmt: skip
    ],
)
def test_inputs_read_by_their_bytes_audit_cleanly(env: Env, build: Callable[[Path], Path], warning: str | None) -> None:
    """Not errors: the format comes from the bytes (with one warning line) and CUDA storages map to the CPU."""
    path = build(env.d)
    code, stdout, stderr = invoke(["audit", str(path), *MODEL, *DATA, "--batches", "1", "--no-rules", "--format", "json"])
    assert code == 0, stderr
    assert Report.from_dict(json.loads(stdout)).sites["5"].dead_channels == (3, 7)
    lines = stderr.strip().splitlines()
    assert (lines == []) if warning is None else (len(lines) == 1 and warning in lines[0]), stderr
