"""`deadneuron audit` on byte-mutated checkpoints (issue 7): a report or one of our errors, never a traceback.

The module-level fuzz of load_checkpoint is in tests/test_checkpoint.py; this one runs the whole command
(load, match to the model, audit, JSON) in-process through CliRunner on a small conv state_dict.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deadneuron.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.py"
OUR_ERRORS = {2, 3, 4, 5, 6, 7}  # 1 (gate) cannot happen: no gate option is given

Mutation = tuple[str, int, int]
# A position counts from the start, or from the end when negative (a zip's directory is at its end).
_position = st.integers(-300, 10**6)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _position, st.just(0)),
    st.tuples(st.just("insert"), _position, st.integers(1, 16)),
    st.tuples(st.just("zero"), _position, st.integers(1, 256)),
)


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes((at * 31 + i) % 256 for i in range(value))
        elif kind == "zero":
            out[at : at + value] = bytes(len(out[at : at + value]))
    return bytes(out)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The small_cnn state_dict as torch.save writes it (zip) and in the legacy pickle format, and the
    folder the mutants go to. The zip's CRCs catch most mutations; the legacy file's reach the unpickler."""
    spec = importlib.util.spec_from_file_location("small_cnn_for_fuzz", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("fuzz")
    module.make(folder / "seed.pth")
    state = torch.load(folder / "seed.pth", weights_only=True)
    torch.save(state, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    return folder, {"zip": (folder / "seed.pth").read_bytes(), "legacy": (folder / "legacy.pth").read_bytes()}


@settings(
    max_examples=20,  # per seed
    deadline=None,
    derandomize=True,  # the same mutants on every run: a CI failure reproduces locally
    database=None,
)
@pytest.mark.parametrize("seed", ["zip", "legacy"])
@given(mutations=st.lists(_mutation, min_size=1, max_size=3))
@example(mutations=[])  # the unmutated file audits cleanly: the property is not vacuous
def test_audit_of_a_mutated_checkpoint_reports_or_fails_with_one_line(
    seeds: tuple[Path, dict[str, bytes]], seed: str, mutations: list[Mutation]
) -> None:
    folder, data = seeds
    path = folder / f"mutant-{seed}.pth"
    path.write_bytes(mutate(data[seed], mutations))
    result = CliRunner().invoke(app, [
        "audit", str(path), "--model", f"{EXAMPLE}:build", "--data", f"{EXAMPLE}:batches", "--batches", "1",
        "--format", "json", "--no-rules",
    ])  # fmt: skip
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}") from result.exception
    assert "Traceback" not in result.stderr
    if not mutations:
        assert result.exit_code == 0, result.stderr
    if result.exit_code == 0:
        assert json.loads(result.stdout)["sites"], result.stdout[:200]
        return
    assert result.exit_code in OUR_ERRORS, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadneuron: error: "), result.stderr
