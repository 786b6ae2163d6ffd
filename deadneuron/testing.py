"""A model's activation health as test assertions.

    from deadneuron.testing import assert_healthy, assert_sparsity_below

    def test_encoder_has_no_dead_channels():
        assert_healthy(model, batches, sites=["encoder.*"], max_dead_fraction=0.0)

Each helper takes a model with its data (it audits them) or an existing Report, and raises an
AssertionError whose message lists every offending site with its figure and the threshold. The pytest
plugin (``deadneuron.pytest_plugin``) adds an ``activation_audit`` fixture on top of ``AuditCache``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deadneuron.gate import GateLimits, check, failure_message
from deadneuron.report import Report


def _report_of(model_or_report: nn.Module | Report, data: Iterable[Any] | None, adapter: Any) -> Report:
    if isinstance(model_or_report, Report):
        if data is not None:
            raise TypeError("pass data only with a model: a Report has been measured already")
        return model_or_report
    if not isinstance(model_or_report, nn.Module):
        raise TypeError(f"expected an nn.Module or a deadneuron Report, got {type(model_or_report).__name__}")
    if data is None:
        raise TypeError("auditing a model needs data: assert_healthy(model, batches, ...)")
    from deadneuron.audit import audit

    return audit(model_or_report, data, adapter=adapter, progress=False)


def assert_healthy(
    model_or_report: nn.Module | Report,
    data: Iterable[Any] | None = None,
    *,
    sites: Sequence[str] | None = None,
    max_dead_fraction: float | None = 0.0,
    max_sparsity: float | None = None,
    min_active_slots: float | None = None,
    adapter: Any = None,
) -> Report:
    """Fail unless every site in ``sites`` (globs; default all) is within the limits. Returns the Report.

    Defaults: no dead channel anywhere. ``max_sparsity`` bounds each site's exact-zero share,
    ``min_active_slots`` the mean number of active slots per image (slot models only).
    """
    report = _report_of(model_or_report, data, adapter)
    limits = GateLimits(
        max_dead_fraction=max_dead_fraction, max_sparsity=max_sparsity,
        min_active_slots=min_active_slots, sites=tuple(sites or ()),
    )  # fmt: skip
    violations = check(report, limits)
    if violations:
        raise AssertionError(failure_message(violations, header=f"{_subject(report)} is not healthy"))
    return report


def assert_sparsity_below(
    model_or_report: nn.Module | Report,
    max_sparsity: float,
    *,
    data: Iterable[Any] | None = None,
    sites: Sequence[str] | None = None,
    adapter: Any = None,
) -> Report:
    """Fail unless each site in ``sites`` (default all) has sparsity <= ``max_sparsity``.

    ``assert_sparsity_below(report, 0.4)`` or, auditing a model, ``assert_sparsity_below(model, 0.4, data=batches)``.
    """
    report = _report_of(model_or_report, data, adapter)
    violations = check(report, GateLimits(max_sparsity=max_sparsity, sites=tuple(sites or ())))
    if violations:
        raise AssertionError(failure_message(violations, header=f"{_subject(report)} is too sparse"))
    return report


def _subject(report: Report) -> str:
    return str(report.meta.get("source") or report.meta.get("model") or "model")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer: a cached audit is reused only for unchanged weights."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AuditCache:
    """Audits models, each once per (model object, weights, options); optionally keeps each report.

    Used by the pytest plugin's ``activation_audit`` fixture (one cache per test session). A model is
    keyed by identity *and* weight fingerprint, so a test that trains the model gets a fresh audit. The
    cache holds a reference to every model it audited so that an id is never reused within a session.
    """

    report_dir: Path | None = None
    _entries: dict[tuple[Any, ...], tuple[nn.Module, Report]] = field(default_factory=dict)
    audits: int = 0  # audits actually run (for tests of the cache)

    def audit(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        select: Sequence[str] | None = None,
        eps: float = 0.0,
        delta: float = 0.05,
        max_batches: int | None = None,
        adapter: Any = None,
        test_id: str = "",
    ) -> Report:
        key = (id(model), model_fingerprint(model), tuple(select or ()), eps, delta, max_batches, id(adapter))
        if key in self._entries:
            return self._entries[key][1]
        from deadneuron.audit import audit

        report = audit(model, data, select=select, eps=eps, delta=delta, max_batches=max_batches,
                       adapter=adapter, progress=False, meta={"source": type(model).__name__})  # fmt: skip
        self.audits += 1
        self._entries[key] = (model, report)
        if self.report_dir is not None:
            self._keep(report, test_id or type(model).__name__)
        return report

    def _keep(self, report: Report, test_id: str) -> None:
        from deadneuron.checkpoint import atomic_write_text
        from deadneuron.render.markdown import render_markdown

        folder = Path(self.report_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_id).strip("_") or "report"
        atomic_write_text(report.to_json(indent=1), folder / f"{stem}.json", force=True)
        atomic_write_text(render_markdown(report), folder / f"{stem}.md", force=True)


__all__ = ["AuditCache", "assert_healthy", "assert_sparsity_below", "model_fingerprint"]
