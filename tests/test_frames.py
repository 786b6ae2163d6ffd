"""DataFrames of a report, checked against the audit of a model with planted dead channels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import deadneuron


def _planted_report() -> deadneuron.Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    with torch.no_grad():
        model[0].bias[[1, 3]] = -100.0  # channels 1 and 3 never fire
    return deadneuron.audit(model, [torch.randn(8, 6) for _ in range(2)], progress=False)


def test_sites_frame_one_row_per_site() -> None:
    frame = deadneuron.sites_frame(_planted_report())
    assert list(frame["name"]) == ["1"]
    row = frame.iloc[0]
    assert row["channels"] == 5 and row["dead"] == 2 and row["axis_source"] == "producer"


def test_channels_frame_one_row_per_channel() -> None:
    frame = deadneuron.channels_frame(_planted_report())
    assert len(frame) == 5
    assert list(np.flatnonzero(frame["dead"].to_numpy())) == [1, 3]
    np.testing.assert_array_equal(frame.loc[frame["dead"], "flat_fraction"], [1.0, 1.0])


def test_save_report_round_trips(tmp_path) -> None:
    report = _planted_report()
    path = deadneuron.save_report(report, tmp_path / "r.json")
    assert deadneuron.Report.from_json(path.read_text()).to_dict() == report.to_dict()
