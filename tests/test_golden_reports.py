"""The stored golden reports are real audits: a fresh audit of each demo checkpoint equals the stored JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests import golden_reports


def _assert_same(fresh: Any, stored: Any, path: str = "report") -> None:
    if isinstance(stored, float) and isinstance(fresh, float):
        assert math.isclose(fresh, stored, rel_tol=1e-9, abs_tol=0.0) or fresh == stored, (
            f"{path}: {fresh} != {stored}"
        )
        return
    assert type(fresh) is type(stored), f"{path}: {type(fresh).__name__} != {type(stored).__name__}"
    if isinstance(stored, dict):
        assert list(fresh) == list(stored), f"{path}: keys {list(fresh)} != {list(stored)}"
        for key in stored:
            _assert_same(fresh[key], stored[key], f"{path}.{key}")
    elif isinstance(stored, list):
        assert len(fresh) == len(stored), f"{path}: length {len(fresh)} != {len(stored)}"
        for i, (f, s) in enumerate(zip(fresh, stored, strict=True)):
            _assert_same(f, s, f"{path}[{i}]")
    else:
        assert fresh == stored, f"{path}: {fresh!r} != {stored!r}"


@pytest.mark.parametrize("name", ["a", "b"])
def test_stored_golden_report_is_a_fresh_audit(name: str) -> None:
    stored = json.loads((golden_reports.GOLDEN / f"report_{name}.json").read_text())
    fresh = json.loads(json.dumps(golden_reports.build(name).to_dict()))
    _assert_same(golden_reports.stable(fresh), golden_reports.stable(stored))


def test_the_comparison_sees_a_changed_figure() -> None:
    stored = json.loads((golden_reports.GOLDEN / "report_a.json").read_text())
    changed = json.loads(json.dumps(stored))
    changed["sites"][0]["sparsity"] *= 1 + 1e-6
    with pytest.raises(AssertionError, match=r"sites\[0\]\.sparsity"):
        _assert_same(changed, stored)
