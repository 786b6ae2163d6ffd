"""`deadneuron audit` through typer's CliRunner: the table, JSON, and each exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.cli import app
from deadneuron.report import Report

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "small_cnn.py"


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_cnn_example", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    mod.make(path)
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def base(ckpt: Path) -> list[str]:
    return ["audit", str(ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{EXAMPLE}:batches"]


def test_table_lists_every_site_and_the_planted_dead_channels(small_ckpt: Path) -> None:
    code, out, err = run(*base(small_ckpt))
    assert code == 0, err
    assert "Activation sites" in out
    assert "verdict: 2 dead channels at 1 site" in out and "channels 3, 7" not in out
    code, out, err = run(*base(small_ckpt), "--verbose")
    assert code == 0, err
    assert "channels 3, 7" in out
    for col in ("sparsity", "flat", "dead", "dormant"):
        assert col in out


def test_json_is_the_report_and_round_trips(small_ckpt: Path) -> None:
    code, out, err = run(*base(small_ckpt), "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    report = Report.from_dict(data)
    assert report.to_dict() == data
    assert report.sites["5"].dead_channels == (3, 7)
    assert report.summary.dead == 2


def test_random_inputs_are_flagged(small_ckpt: Path) -> None:
    code, out, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--input-shape", "2,3,8,8", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["meta"]["random_inputs"] is True
    assert any("random inputs" in w for w in data["meta"]["warnings"])


def test_out_writes_report_json(small_ckpt: Path, tmp_path: Path) -> None:
    code, _, err = run(*base(small_ckpt), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert Report.from_json((tmp_path / "rep" / "report.json").read_text()).summary.dead == 2


def _one_line(err: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        pytest.param(["--batches", "0"], 2, id="batches-0"),
        pytest.param(["--eps", "-1"], 2, id="negative-eps"),
        pytest.param(["--delta", "-0.1"], 2, id="negative-delta"),
        pytest.param(["--format", "yaml"], 2, id="bad-format"),
    ],
)
def test_usage_errors(small_ckpt: Path, extra: list[str], code: int) -> None:
    c, _, err = run(*base(small_ckpt), *extra)
    assert c == code
    _one_line(err)


def test_missing_model_and_data(small_ckpt: Path) -> None:
    c, _, err = run("audit", str(small_ckpt))
    assert c == 2 and "--model" in err
    _one_line(err)
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build")
    assert c == 2 and "--data" in err
    _one_line(err)


def test_malformed_input_shape(small_ckpt: Path) -> None:
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--input-shape", "8,three")
    assert c == 2 and "--input-shape" in err
    _one_line(err)


@pytest.mark.parametrize("shape", ["4,x,8,8", "4,,8,8", "4,3,8,8,", "4x3xx8"])
def test_input_shape_with_an_empty_or_lone_x_part_is_refused_not_shortened(small_ckpt: Path, shape: str) -> None:
    # '4,x,8,8' once ran on (4, 8, 8): a dim was dropped silently and the forward pass failed on a shape never asked for
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--input-shape", shape)
    assert c == 2 and "--input-shape" in err and repr(shape) in err
    _one_line(err)


def test_wrong_model_path(small_ckpt: Path) -> None:
    c, _, err = run("audit", str(small_ckpt), "--model", "no_such_module_xyz:build", "--input-shape", "1,3,8,8")
    assert c == 2 and "no_such_module_xyz" in err
    _one_line(err)


def test_factory_that_raises(small_ckpt: Path, tmp_path: Path) -> None:
    f = tmp_path / "bad_factory.py"
    f.write_text("def build():\n    raise ValueError('width must be even')\n")
    c, _, err = run("audit", str(small_ckpt), "--model", f"{f}:build", "--input-shape", "1,3,8,8")
    assert c == 6 and "width must be even" in err
    _one_line(err)


def test_data_that_yields_nothing(small_ckpt: Path, tmp_path: Path) -> None:
    f = tmp_path / "empty_data.py"
    f.write_text("def batches():\n    return []\n")
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{f}:batches")
    assert c == 2 and "no batches" in err
    _one_line(err)


def test_batches_of_the_wrong_shape_name_the_site(small_ckpt: Path) -> None:
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--input-shape", "2,5,8,8")
    assert c == 6 and "(2, 5, 8, 8)" in err and "before any activation site ran" in err
    _one_line(err)


def test_missing_path_and_folder(tmp_path: Path) -> None:
    c, _, err = run("audit", str(tmp_path / "nope.pth"), "--input-shape", "1,3,8,8")
    assert c == 4 and "nope.pth" in err
    _one_line(err)
    c, _, err = run("audit", str(tmp_path), "--input-shape", "1,3,8,8")
    assert c == 4
    _one_line(err)


def test_state_dict_mismatch_exits_5(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    c, _, err = run("audit", str(path), "--model", f"{EXAMPLE}:build", "--input-shape", "1,3,8,8")
    assert c == 5 and "missing" in err
    _one_line(err)


def test_malicious_checkpoint_exits_3_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    c, _, err = run("audit", str(path), "--model", f"{EXAMPLE}:build", "--input-shape", "1,3,8,8")
    assert c == 3 and "--" in err
    _one_line(err)
    assert not marker.exists()


def test_unwritable_out_exits_7(small_ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c, _, err = run(*base(small_ckpt), "--out", str(blocker / "sub"))
    assert c == 7
    _one_line(err)


@pytest.mark.parametrize("name", ["report.md", "report.html", "report.json", "figure.png"])
def test_out_named_like_a_report_file_is_refused_before_any_work(small_ckpt: Path, tmp_path: Path, name: str) -> None:
    # --out is a folder: 'report.md' once became a folder named report.md holding report.html, .json and figures
    target = tmp_path / name
    c, out, err = run(*base(small_ckpt), "--out", str(target))
    assert c == 2 and "--out" in err and "folder" in err and not out
    assert not target.exists()
    _one_line(err)


def test_out_an_existing_folder_with_a_suffix_is_still_a_folder(small_ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "run.v1.json"
    target.mkdir()
    c, _, err = run(*base(small_ckpt), "--out", str(target))
    assert c == 0, err
    assert (target / "report.json").is_file() and (target / "report.md").is_file()


def test_data_raising_half_way_is_named_once_with_its_own_exception(small_ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards.py"
    data.write_text(
        "import torch\n\n"
        "def batches():\n"
        "    yield torch.randn(2, 3, 8, 8)\n"
        "    raise KeyError('missing shard 7')\n"
    )
    c, _, err = run("audit", str(small_ckpt), "--model", f"{EXAMPLE}:build", "--data", f"{data}:batches")
    assert c == 6, err
    assert "KeyError" in err and "missing shard 7" in err and "batch 1" in err
    assert "AuditRuntimeError" not in err and err.count("while producing") == 1  # once wrapped it read twice
    _one_line(err)
