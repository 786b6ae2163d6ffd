"""`Report.from_json` takes the report's JSON text; given the path `save_report` wrote to (the README's
"reads it back"), it says so in one line instead of a bare JSONDecodeError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.report import Report


def test_a_saved_report_reads_back_from_its_text_and_a_path_is_named(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    report = deadneuron.audit(model, [torch.randn(5, 3)])
    path = deadneuron.save_report(report, tmp_path / "report.json")
    assert Report.from_json(Path(path).read_text()).to_dict() == report.to_dict()
    with pytest.raises(ValueError, match=r"takes the report's JSON text, not a path: .*read_text\(\)"):
        Report.from_json(str(path))
    with pytest.raises(ValueError, match=r"Expecting"):  # other bad text: json's own message
        Report.from_json("[1, 2")
