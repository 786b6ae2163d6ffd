"""Checkpoint loading, matching and saving: bad inputs, hostile files, interrupted writes."""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deadneuron import _atomic, _sniff
from deadneuron.adapters import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from deadneuron.checkpoint import (
    CheckpointFormat,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    extract_state_dict,
    file_sha256,
    load_checkpoint,
    load_state_dict_strict,
    nonfinite_parameters,
    sniff,
    strip_common_prefix,
)
from deadneuron.errors import (
    DeadneuronError,
    ModelMismatchError,
    UnreadableInputError,
    UnsafeCheckpointError,
    UsageError,
    WriteError,
)

try:
    import fixtures_checkpoints as fx
except ImportError:  # tests/ run as a package
    from tests import fixtures_checkpoints as fx


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_one_line(err: DeadneuronError, mentions: str) -> None:
    message = str(err)
    assert "\n" not in message and message.strip() == message and message
    assert mentions in message


def quiet(message: str) -> None:
    """A ``warn`` that drops warnings; tests that check them collect them instead."""


# --- bad inputs: one builder per case -------------------------------------------------------------------


def _missing(d: Path) -> Path:
    return d / "nope.pth"


def _folder(d: Path) -> Path:
    (d / "run1").mkdir()
    return d / "run1"


def _truncated_zip(d: Path) -> Path:
    data = fx.save(d, "full.pth", fx.tiny_state_dict()).read_bytes()
    (d / "full.pth").unlink()
    return fx.write(d, "half.pth", data[: len(data) // 2])


def _zip_head_only(d: Path) -> Path:
    data = fx.save(d, "full.pth", fx.tiny_state_dict()).read_bytes()
    (d / "full.pth").unlink()
    return fx.write(d, "head.pth", data[:100])


def _truncated_legacy(d: Path) -> Path:
    data = fx.save(d, "full.pth", fx.tiny_state_dict(), _use_new_zipfile_serialization=False).read_bytes()
    (d / "full.pth").unlink()
    return fx.write(d, "legacy_cut.pth", data[: len(data) // 3])


def _truncated_safetensors(d: Path) -> Path:
    data = fx.safetensors_file(d).read_bytes()
    (d / "weights.safetensors").unlink()
    return fx.write(d, "cut.safetensors", data[: len(data) - 20])


def _bad_safetensors_header(d: Path) -> Path:
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 999]}}'
    return fx.write(d, "bad.safetensors", len(header).to_bytes(8, "little") + header + b"\0" * 8)


def _flipped(d: Path) -> Path:
    return fx.flip_tensor_byte(fx.save(d, "flipped.pth", {"w": torch.randn(64, 64)}))


def _malicious(legacy: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        payload = {"state_dict": fx.tiny_state_dict(), "x": fx.RunsCommand(d / "MARKER")}
        return fx.save(d, "evil.pth", payload, _use_new_zipfile_serialization=not legacy)

    return build


def _malicious_protocol4_zip(d: Path) -> Path:
    return fx.save(d, "evil4.pth", {"x": fx.RunsCommand(d / "MARKER")}, pickle_protocol=4)


def _malicious_plain_pickle(d: Path) -> Path:
    return fx.write(d, "evil.pkl", fx.plain_pickle(fx.RunsCommand(d / "MARKER")))


def _whole_module(legacy: bool) -> Callable[[Path], Path]:
    return lambda d: fx.save(d, "model.pth", fx.tiny_model(), _use_new_zipfile_serialization=not legacy)


def _non_torch_zip(d: Path) -> Path:
    with zipfile.ZipFile(d / "archive.pth", "w") as archive:
        archive.writestr("readme.txt", "hello")
    return d / "archive.pth"


BAD_INPUTS = [
    pytest.param(_missing, UnreadableInputError, "no such file", id="missing-path"),
    pytest.param(_folder, UnreadableInputError, "is a folder", id="a-folder"),
    pytest.param(
        lambda d: fx.write(d, "zero.pth", b""), UnreadableInputError, "empty (0 bytes)", id="zero-bytes"
    ),
    pytest.param(
        lambda d: fx.write(d, "noise.pth", random.Random(0).randbytes(4096)),
        UnreadableInputError,
        "random bytes?",
        id="random-bytes",
    ),
    pytest.param(
        lambda d: fx.write(d, "notes.pth", b"hello\n"), UnreadableInputError, "a text file", id="text"
    ),
    pytest.param(
        lambda d: fx.write(d, "lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"),
        UnreadableInputError,
        "git lfs pull",
        id="git-lfs-pointer",
    ),
    pytest.param(
        lambda d: fx.write(d, "h5.pth", b"\x89HDF\r\n\x1a\n" + b"\0" * 64),
        UnreadableInputError,
        "HDF5",
        id="hdf5",
    ),
    pytest.param(_non_torch_zip, UnreadableInputError, "zip archive that is not", id="other-zip"),
    pytest.param(_truncated_zip, UnreadableInputError, "corrupt or truncated", id="truncated-zip"),
    pytest.param(_zip_head_only, UnreadableInputError, "corrupt or truncated", id="truncated-zip-100-bytes"),
    pytest.param(_truncated_legacy, UnreadableInputError, "corrupt or truncated", id="truncated-legacy"),
    pytest.param(
        _truncated_safetensors, UnreadableInputError, "corrupt or truncated", id="truncated-safetensors"
    ),
    pytest.param(
        _bad_safetensors_header, UnreadableInputError, "corrupt or truncated", id="bad-safetensors-header"
    ),
    pytest.param(_flipped, UnreadableInputError, "Bad CRC-32", id="flipped-tensor-byte"),
    pytest.param(
        fx.namespace_checkpoint, UnsafeCheckpointError, "argparse.Namespace", id="argparse-namespace"
    ),
    pytest.param(fx.dataclass_checkpoint, UnsafeCheckpointError, "TrainConfig", id="dataclass"),
    pytest.param(
        fx.numpy_scalar_checkpoint,
        UnsafeCheckpointError,
        "--allow-global numpy._core.multiarray.scalar",
        id="numpy-scalar",
    ),
    pytest.param(fx.numpy_array_checkpoint, UnsafeCheckpointError, "numpy.ndarray", id="numpy-array"),
    pytest.param(_whole_module(legacy=False), UnsafeCheckpointError, "--trust-code", id="whole-module-zip"),
    pytest.param(_whole_module(legacy=True), UnsafeCheckpointError, "--trust-code", id="whole-module-legacy"),
    pytest.param(fx.torchscript_file, UnsafeCheckpointError, "TorchScript", id="torchscript"),
    pytest.param(fx.exported_program_file, UnsafeCheckpointError, "torch.export", id="exported-pt2"),
    pytest.param(_malicious(legacy=False), UnsafeCheckpointError, "posix.system", id="os-system-zip"),
    pytest.param(_malicious(legacy=True), UnsafeCheckpointError, "posix.system", id="os-system-legacy"),
    pytest.param(
        _malicious_protocol4_zip, UnsafeCheckpointError, "posix.system", id="os-system-stack-global"
    ),
    pytest.param(_malicious_plain_pickle, UnsafeCheckpointError, "posix.system", id="os-system-plain-pickle"),
    pytest.param(
        lambda d: fx.write(d, "plain.pkl", fx.plain_pickle({"a": [1, 2]})),
        UnreadableInputError,
        "plain pickle",
        id="plain-pickle",
    ),
    pytest.param(
        lambda d: fx.save(d, "p4.pth", fx.tiny_state_dict(), pickle_protocol=4),
        UnreadableInputError,
        "weights_only loading cannot read it",
        id="pickle-protocol-4",
    ),
    pytest.param(
        lambda d: fx.zip_with_pickle(d, "deep.pth", fx.deeply_nested_pickle()),
        UnreadableInputError,
        "nested more than",
        id="deeply-nested",
    ),
]


@pytest.mark.parametrize(("build", "error", "says"), BAD_INPUTS)
def test_bad_input_is_one_clear_error(
    tmp_path: Path, build: Callable[[Path], Path], error: type[DeadneuronError], says: str
) -> None:
    path = build(tmp_path)
    before = files_in(tmp_path)
    with pytest.raises(DeadneuronError) as caught:
        load_checkpoint(path, warn=quiet)
    assert type(caught.value) is error, str(caught.value)
    assert_one_line(caught.value, str(path))
    assert says.lower() in str(caught.value).lower()
    assert files_in(tmp_path) == before  # nothing written, and no payload ran (no MARKER)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_payload_refused_even_with_trust_code(tmp_path: Path, legacy: bool) -> None:
    path = _malicious(legacy)(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="even with --trust-code"):
        load_checkpoint(path, trust_code=True, allow_globals=["argparse.Namespace"], warn=quiet)
    assert not (tmp_path / "MARKER").exists()


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fx.save(tmp_path, "locked.pth", fx.tiny_state_dict())

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_sniff, "open", denied, raising=False)
    with pytest.raises(UnreadableInputError) as caught:
        load_checkpoint(path, warn=quiet)
    assert_one_line(caught.value, str(path))
    assert "chmod" in str(caught.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_mode(tmp_path: Path) -> None:
    path = fx.save(tmp_path, "locked.pth", fx.tiny_state_dict())
    path.chmod(0)
    with pytest.raises(UnreadableInputError, match="permission denied"):
        load_checkpoint(path, warn=quiet)


# --- formats ------------------------------------------------------------------------------------------


SNIFFED = [
    pytest.param(lambda d: fx.save(d, "a.pth", fx.tiny_state_dict()), CheckpointFormat.ZIP, id="zip"),
    pytest.param(
        lambda d: fx.save(d, "a.pth", {}, _use_new_zipfile_serialization=False),
        CheckpointFormat.LEGACY_PICKLE,
        id="legacy",
    ),
    pytest.param(fx.safetensors_file, CheckpointFormat.SAFETENSORS, id="safetensors"),
    pytest.param(fx.torchscript_file, CheckpointFormat.TORCHSCRIPT, id="torchscript"),
    pytest.param(fx.exported_program_file, CheckpointFormat.EXPORTED_PROGRAM, id="pt2"),
    pytest.param(
        lambda d: fx.write(d, "a.pth", fx.plain_pickle({})), CheckpointFormat.PLAIN_PICKLE, id="plain"
    ),
    pytest.param(lambda d: fx.write(d, "a.pth", b""), CheckpointFormat.EMPTY, id="empty"),
    pytest.param(lambda d: fx.write(d, "a.pth", b"\x00\x01junk"), CheckpointFormat.UNKNOWN, id="unknown"),
]


@pytest.mark.parametrize(("build", "expected"), SNIFFED)
def test_sniff_reads_the_bytes_not_the_name(
    tmp_path: Path, build: Callable[[Path], Path], expected: CheckpointFormat
) -> None:
    misleading = "x.pth" if expected is CheckpointFormat.SAFETENSORS else "x.safetensors"
    renamed = build(tmp_path).rename(tmp_path / misleading)
    assert sniff(renamed) is expected


def test_state_dict_zip_and_legacy_load(tmp_path: Path) -> None:
    sd = fx.tiny_state_dict()
    for legacy in (False, True):
        path = fx.save(tmp_path, f"{legacy}.pth", sd, _use_new_zipfile_serialization=not legacy)
        loaded = load_checkpoint(path, warn=quiet)
        assert isinstance(loaded, dict) and all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_safetensors_loads_under_any_name(tmp_path: Path) -> None:
    path = fx.safetensors_file(tmp_path).rename(tmp_path / "weights.pth")
    loaded = load_checkpoint(path, warn=quiet)
    assert isinstance(loaded, dict) and set(loaded) == set(fx.tiny_state_dict())


def test_pth_renamed_safetensors_loads_by_its_bytes_with_a_warning(tmp_path: Path) -> None:
    path = fx.save(tmp_path, "weights.safetensors", fx.tiny_state_dict())
    warnings: list[str] = []
    loaded = load_checkpoint(path, warn=warnings.append)
    assert isinstance(loaded, dict) and set(loaded) == set(fx.tiny_state_dict())
    assert len(warnings) == 1 and "is not safetensors" in warnings[0]


def test_tensors_saved_on_cuda_load_on_cpu(tmp_path: Path) -> None:
    path = fx.save_as_if_from_cuda(tmp_path, "gpu.pth", {"model_state_dict": fx.tiny_state_dict()})
    assert b"cuda:0" in zipfile.ZipFile(path).read("gpu/data.pkl")
    loaded = load_checkpoint(path, warn=quiet)
    assert isinstance(loaded, dict)
    assert all(t.device.type == "cpu" for t in loaded["model_state_dict"].values())


def test_checkpoint_without_crcs_still_loads(tmp_path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        path = fx.save(tmp_path, "nocrc.pth", fx.tiny_state_dict())
    finally:
        torch.serialization.set_crc32_options(True)
    assert set(load_checkpoint(path, warn=quiet)) == set(fx.tiny_state_dict())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "allow", "key", "kind"),
    [
        pytest.param(
            fx.namespace_checkpoint, ["argparse.Namespace"], "args", argparse.Namespace, id="namespace"
        ),
        pytest.param(
            fx.dataclass_checkpoint,
            [f"{fx.TrainConfig.__module__}.TrainConfig"],
            "config",
            fx.TrainConfig,
            id="dataclass",
        ),
        pytest.param(
            fx.numpy_scalar_checkpoint,
            ["numpy._core.multiarray.scalar", "numpy.dtype"],
            "best_acc",
            np.float64,
            id="numpy-scalar",
        ),
        pytest.param(
            fx.numpy_array_checkpoint,
            ["numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"],
            "curve",
            np.ndarray,
            id="numpy-array",
        ),
    ],
)
def test_allow_global_opens_exactly_the_named_types(
    tmp_path: Path, build: Callable[[Path], Path], allow: list[str], key: str, kind: type
) -> None:
    before = set(torch.serialization.get_safe_globals())
    loaded = load_checkpoint(build(tmp_path), allow_globals=allow, warn=quiet)
    assert isinstance(loaded, dict) and isinstance(loaded[key], kind)
    assert set(torch.serialization.get_safe_globals()) == before  # allowed only for that one load


@pytest.mark.parametrize(
    "name",
    [
        "os.system", "posix.system", "builtins.exec", "builtins.eval", "builtins.compile", "builtins.getattr",
        "builtins.__import__", "subprocess.Popen", "runpy.run_path", "importlib.import_module", "pickle.loads",
        "sys.exit", "shutil.rmtree",
    ],
)  # fmt: skip
def test_allow_global_refuses_code_running_names(name: str) -> None:
    with pytest.raises(UsageError) as caught:
        load_checkpoint("unused.pth", allow_globals=[name], warn=quiet)
    assert_one_line(caught.value, name)


@pytest.mark.parametrize("name", ["no_such_module.Thing", "argparse", "argparse.NoSuchName", "Namespace"])
def test_allow_global_must_name_an_importable_attribute(name: str) -> None:
    with pytest.raises(UsageError, match="cannot import"):
        load_checkpoint("unused.pth", allow_globals=[name], warn=quiet)


def test_trusted_torchscript_yields_its_weights_and_says_why(tmp_path: Path) -> None:
    path = fx.torchscript_file(tmp_path)
    warnings: list[str] = []
    weights = load_checkpoint(path, trust_code=True, warn=warnings.append)
    assert isinstance(weights, dict) and set(weights) == set(fx.tiny_state_dict())
    assert file_sha256(path) in warnings[0]
    assert "forward hooks" in warnings[1] and "--model" in warnings[1]


def test_trusted_exported_program_yields_its_weights(tmp_path: Path) -> None:
    warnings: list[str] = []
    weights = load_checkpoint(fx.exported_program_file(tmp_path), trust_code=True, warn=warnings.append)
    assert isinstance(weights, dict) and set(weights) == set(fx.tiny_state_dict())
    assert "SHA-256" in warnings[0] and "forward hooks" in warnings[1]


def test_trusted_whole_module_loads_with_a_warning(tmp_path: Path) -> None:
    path = fx.save(tmp_path, "model.pth", fx.tiny_model())
    warnings: list[str] = []
    model = load_checkpoint(path, trust_code=True, warn=warnings.append)
    assert isinstance(model, nn.Sequential)
    assert len(warnings) == 1 and file_sha256(path) in warnings[0]


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = fx.write(tmp_path, "x.bin", b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


# --- fuzzing ------------------------------------------------------------------------------------------

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value])
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    sd = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    return {
        "zip": fx.save(folder, "a.pth", {"state_dict": sd, "step": 3}).read_bytes(),
        "legacy": fx.save(
            folder, "b.pth", {"state_dict": sd}, _use_new_zipfile_serialization=False
        ).read_bytes(),
    }


@pytest.mark.parametrize("seed_name", ["zip", "legacy"])
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same mutations on every run: a CI failure reproduces locally
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_mutated_checkpoint_loads_or_fails_cleanly(
    fuzz_seeds: dict[str, bytes], tmp_path: Path, seed_name: str, mutations: list[tuple[str, int, int]]
) -> None:
    path = fx.write(tmp_path, f"fuzz-{seed_name}.pth", _mutate(fuzz_seeds[seed_name], mutations))
    try:
        load_checkpoint(path, warn=quiet)
    except DeadneuronError as err:
        assert_one_line(err, str(path))


# --- state_dicts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"model_state_dict": sd, "epoch": 3}, id="model_state_dict"),
        pytest.param(lambda sd: {"state_dict": sd, "optimizer": {}}, id="state_dict"),
        pytest.param(
            lambda sd: {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": {},
                "state_dict": sd,
            },
            id="deadneuron-checkpoint",
        ),
    ],
)
def test_extract_state_dict(wrap: Callable[[dict[str, torch.Tensor]], object]) -> None:
    sd = fx.tiny_state_dict()
    assert extract_state_dict(wrap(sd), source="ck.pth").keys() == sd.keys()


def test_extract_state_dict_from_a_module() -> None:
    assert extract_state_dict(fx.tiny_model(), source="m.pth").keys() == fx.tiny_state_dict().keys()


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"epoch": 3, "lr": 0.1}, id="no-weights"),
        pytest.param({"state_dict": {"w": torch.ones(1), "note": "hi"}}, id="non-tensor"),
        pytest.param([torch.ones(1)], id="a-list"),
        pytest.param({}, id="empty"),
    ],
)
def test_extract_state_dict_says_what_it_found(obj: object) -> None:
    with pytest.raises(UnreadableInputError) as caught:
        extract_state_dict(obj, source="ck.pth")
    assert_one_line(caught.value, "ck.pth")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["module.a", "module.b"], ["a", "b"]),
        (["_orig_mod.a", "_orig_mod.b"], ["a", "b"]),
        (["_orig_mod.module.a"], ["a"]),
        (["module.a", "b"], ["module.a", "b"]),
        (["modules.a"], ["modules.a"]),
    ],
)
def test_strip_common_prefix(keys: list[str], expected: list[str]) -> None:
    assert list(strip_common_prefix(dict.fromkeys(keys, 0))) == expected


def test_load_state_dict_strict_accepts_exact_and_prefixed() -> None:
    sd = fx.tiny_state_dict()
    for weights in (sd, {f"module.{k}": v for k, v in sd.items()}):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        load_state_dict_strict(model, weights, source="ck.pth")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        pytest.param(
            lambda sd: {k: v for k, v in sd.items() if k != "2.bias"}, "1 missing key (2.bias)", id="missing"
        ),
        pytest.param(
            lambda sd: {**sd, "head.w": torch.ones(1)}, "1 unexpected key (head.w)", id="unexpected"
        ),
        pytest.param(
            lambda sd: {**sd, "0.weight": torch.ones(5, 3)}, "0.weight (5, 3) vs model (4, 3)", id="shape"
        ),
        pytest.param(lambda sd: {f"x{i}": torch.ones(1) for i in range(9)}, "and 6 more", id="many"),
    ],
)
def test_load_state_dict_strict_names_the_mismatch(
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], says: str
) -> None:
    model = fx.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelMismatchError) as caught:
        load_state_dict_strict(model, edit(fx.tiny_state_dict()), source="ck.pth")
    assert_one_line(caught.value, "ck.pth")
    assert says in str(caught.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_nonfinite_parameters() -> None:
    sd = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan"), float("nan")]),
        "inf": torch.tensor([float("inf"), -float("inf")]),
        "int": torch.tensor([1, 2]),
    }
    assert nonfinite_parameters(sd) == {"nan": 2, "inf": 2}


# --- saving -------------------------------------------------------------------------------------------


def test_atomic_save_round_trips(tmp_path: Path) -> None:
    obj = {"format": CHECKPOINT_FORMAT, "state_dict": fx.tiny_state_dict(), "history": [1.0, 2.0]}
    path = atomic_save(obj, tmp_path / "out.pth")
    assert files_in(tmp_path) == {"out.pth"}
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert loaded.keys() == obj.keys()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_save_needs_force_to_overwrite(tmp_path: Path) -> None:
    path = fx.write(tmp_path, "out.pth", b"precious")
    with pytest.raises(UsageError) as caught:
        atomic_save({"a": 1}, path)
    assert_one_line(caught.value, "pass --force")
    assert path.read_bytes() == b"precious"
    atomic_save({"a": 1}, path, force=True)
    assert torch.load(path, weights_only=True) == {"a": 1}


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_atomic_save_never_overwrites_an_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    source = fx.save(tmp_path, "in.pth", fx.tiny_state_dict())
    original = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    target = {"same": source, "relative": Path("in.pth"), "symlink": tmp_path / "link.pth"}[spelling]
    if spelling == "symlink":
        target.symlink_to(source)
    before = files_in(tmp_path)
    with pytest.raises(UsageError) as caught:
        atomic_save({"a": 1}, target, force=True, protect=[source])
    assert_one_line(caught.value, "never overwritten")
    assert source.read_bytes() == original and files_in(tmp_path) == before


@pytest.mark.parametrize(
    ("target", "says"),
    [
        pytest.param(
            lambda d: (d / "out.pth").mkdir() or d / "out.pth", "is a folder", id="output-is-a-folder"
        ),
        pytest.param(lambda d: d / "missing" / "out.pth", "does not exist", id="missing-folder"),
    ],
)
def test_atomic_save_bad_destination(tmp_path: Path, target: Callable[[Path], Path], says: str) -> None:
    path = target(tmp_path)
    before = files_in(tmp_path)
    with pytest.raises(WriteError) as caught:
        atomic_save({"a": 1}, path, force=True)
    assert_one_line(caught.value, says)
    assert files_in(tmp_path) == before


class _FailingFile:
    """Stands in for the temp file: writes ``limit`` bytes, then raises ``error``."""

    def __init__(self, real: object, limit: int, error: BaseException) -> None:
        self._real, self._limit, self._error = real, limit, error

    def write(self, data: bytes) -> int:
        if self._limit <= 0:
            raise self._error
        self._limit -= len(data)
        return self._real.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("error", "raised", "says"),
    [
        pytest.param(
            OSError(errno.ENOSPC, "No space left on device"), WriteError, "disk is full", id="disk-full"
        ),
        pytest.param(OSError(errno.EIO, "Input/output error"), WriteError, "write failed", id="io-error"),
        pytest.param(KeyboardInterrupt(), KeyboardInterrupt, "", id="ctrl-c"),
    ],
)
def test_failed_save_leaves_the_old_file_and_no_temp(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    raised: type[BaseException],
    says: str,
) -> None:
    path = atomic_save({"old": torch.ones(2)}, tmp_path / "out.pth")
    original = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        _atomic.os, "fdopen", lambda fd, mode: _FailingFile(real_fdopen(fd, mode), 2000, error)
    )
    with pytest.raises(raised) as caught:
        atomic_save({"new": torch.randn(10_000)}, path, force=True)
    if says:
        assert_one_line(caught.value, says)  # type: ignore[arg-type]
    assert path.read_bytes() == original and files_in(tmp_path) == {"out.pth"}


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        pytest.param({"args": argparse.Namespace(a=1)}, "weights_only", id="not-weights-only"),
        pytest.param({"fn": lambda: 0}, "cannot serialise", id="unpicklable"),
    ],
)
def test_atomic_save_refuses_what_would_not_load_back(tmp_path: Path, obj: object, says: str) -> None:
    with pytest.raises(WriteError) as caught:
        atomic_save(obj, tmp_path / "out.pth")
    assert_one_line(caught.value, says)
    assert files_in(tmp_path) == set()


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    path = atomic_write_text("report\n", tmp_path / "r.txt")
    assert atomic_write_bytes(b"v2", path).read_bytes() == b"v2"  # reports overwrite by default
    with pytest.raises(UsageError, match="--force"):
        atomic_write_text("v3", path, force=False)
    assert files_in(tmp_path) == {"r.txt"}


_CHILD_PRELUDE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from deadneuron.checkpoint import atomic_save
    path = sys.argv[1]
    """
)


def _run_child(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", _CHILD_PRELUDE + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigterm_during_save_leaves_no_partial_file(tmp_path: Path) -> None:
    child = _run_child(
        """
        real_save = torch.save
        def save_then_terminate(obj, f):
            f.write(b"partial bytes")
            os.kill(os.getpid(), signal.SIGTERM)
            real_save(obj, f)
        torch.save = save_then_terminate
        atomic_save({"w": torch.ones(3)}, path)
        print("not reached")
        """,
        str(tmp_path / "out.pth"),
    )
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGTERM and out == ""
    assert files_in(tmp_path) == set()


def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    weights = torch.arange(1_000_000, dtype=torch.float32)
    rng = random.Random(1234)
    for round_ in range(4):
        child = _run_child(
            """
            w = torch.arange(1_000_000, dtype=torch.float32)
            print("ready", flush=True)
            step = 0
            while True:
                atomic_save({"step": step, "state_dict": {"w": w}}, path, force=True)
                print(step, flush=True)
                step += 1
            """,
            str(path),
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        finished = [int(child.stdout.readline()) for _ in range(rng.randrange(0, 4))]  # a few saves return...
        time.sleep(rng.uniform(0, 0.03))  # ...then a kill at a random moment inside the next one
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        assert path.exists() or not finished
        if path.exists():
            loaded = load_checkpoint(path, warn=quiet)
            assert isinstance(loaded, dict) and torch.equal(loaded["state_dict"]["w"], weights), round_
            assert loaded["step"] >= max(finished, default=0)  # a save that returned is never lost
        leftovers = files_in(tmp_path) - {"ck.pth"}
        assert all(name.startswith(".ck.pth.") and name.endswith(".tmp") for name in leftovers)
