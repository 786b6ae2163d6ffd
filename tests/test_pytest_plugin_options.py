"""`pytest --deadneuron-report-dir PATH` where PATH is a file: one usage line when the session starts, not
a FileExistsError traceback in every test that uses the activation_audit fixture."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import torch
from torch import nn

def test_uses_the_fixture(activation_audit):
    activation_audit(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), [torch.randn(2, 3)])
"""


def test_a_report_dir_that_is_a_file_is_refused_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=TESTS)
    (pytester.path / "kept").write_text("not a folder")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--deadneuron-report-dir", "kept")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--deadneuron-report-dir kept: is a file; give a folder*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert (pytester.path / "kept").read_text() == "not a folder"
