"""pytest plugin (entry point ``pytest11: deadneuron``): hooks and fixtures only; logic in deadneuron.testing.

Fixture ``activation_audit(model, data, **options) -> Report`` audits a model once per model (its
weights), data (the content of its batches) and options per test session; data that cannot be identified
without consuming it (an iterator, a generator, a DataLoader) is audited on every call. ``--deadneuron-report-dir DIR`` keeps each audited model's report
as ``DIR/<test id>.json`` and ``.md``.

Imports of deadneuron (and torch) happen inside the fixtures: this module is loaded by every pytest run
in an environment where deadneuron is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("deadneuron", "activation-health audits (deadneuron)")
    group.addoption(
        "--deadneuron-report-dir",
        metavar="DIR",
        default=None,
        help="keep the report (JSON and Markdown) of every model audited through the activation_audit fixture",
    )


def pytest_configure(config: pytest.Config) -> None:
    folder = config.getoption("--deadneuron-report-dir", default=None)
    if folder and Path(folder).exists() and not Path(folder).is_dir():
        raise pytest.UsageError(f"--deadneuron-report-dir {folder}: is a file; give a folder (created if missing) "
                                "to keep the reports in")  # fmt: skip


@pytest.fixture(scope="session")
def deadneuron_audit_cache(pytestconfig: pytest.Config) -> Any:
    """The session's AuditCache (one audit per model, weights, data and options)."""
    from deadneuron.testing import AuditCache

    folder = pytestconfig.getoption("--deadneuron-report-dir")
    return AuditCache(report_dir=Path(folder) if folder else None)


@pytest.fixture
def activation_audit(deadneuron_audit_cache: Any, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``activation_audit(model, data, *, select=None, eps=0.0, delta=0.05, max_batches=None, adapter=None)``."""
    return partial(deadneuron_audit_cache.audit, test_id=request.node.nodeid)
