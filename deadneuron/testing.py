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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deadneuron.gate import GateLimits, check, failure_message, fraction
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

    return audit(model_or_report, data, adapter=adapter)


def assert_healthy(
    model_or_report: nn.Module | Report,
    data: Iterable[Any] | None = None,
    *,
    sites: Sequence[str] | str | None = None,
    max_dead_fraction: float | str | None = 0.0,
    max_sparsity: float | str | None = None,
    min_active_slots: float | None = None,
    adapter: Any = None,
    max_nonfinite: int | None = 0,
) -> Report:
    """Fail unless every site in ``sites`` (globs, or one glob as a string; default all) is within the limits.
    Returns the Report.

    Defaults: no dead channel and no NaN/Inf activation anywhere (``max_nonfinite=None`` allows them).
    ``max_sparsity`` bounds each site's exact-zero share; shares are fractions (0.05) or percentages ("5%").
    ``min_active_slots`` bounds the mean number of active slots per image (slot models only).
    """
    report = _report_of(model_or_report, data, adapter)
    limits = GateLimits(
        max_dead_fraction=fraction(max_dead_fraction, "max_dead_fraction"), max_sparsity=fraction(max_sparsity, "max_sparsity"),
        min_active_slots=min_active_slots, sites=_globs(sites), max_nonfinite=max_nonfinite,
    )  # fmt: skip
    violations = check(report, limits)
    if violations:
        raise AssertionError(failure_message(violations, header=f"{_subject(report)} is not healthy"))
    return report


def assert_sparsity_below(
    model_or_report: nn.Module | Report,
    max_sparsity: float | str,
    *,
    data: Iterable[Any] | None = None,
    sites: Sequence[str] | str | None = None,
    adapter: Any = None,
) -> Report:
    """Fail unless each site in ``sites`` (default all) has sparsity <= ``max_sparsity``.

    ``assert_sparsity_below(report, 0.4)`` or, auditing a model, ``assert_sparsity_below(model, 0.4, data=batches)``.
    """
    report = _report_of(model_or_report, data, adapter)
    violations = check(report, GateLimits(max_sparsity=fraction(max_sparsity, "max_sparsity"), sites=_globs(sites)))
    if violations:
        raise AssertionError(failure_message(violations, header=f"{_subject(report)} is too sparse"))
    return report


def _globs(sites: Sequence[str] | str | None) -> tuple[str, ...]:
    """``sites`` as globs: one string is one glob (not one per character)."""
    return (sites,) if isinstance(sites, str) else tuple(sites or ())


def _subject(report: Report) -> str:
    return str(report.meta.get("source") or report.meta.get("model") or "model")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every parameter and buffer: a cached audit is reused only for unchanged weights."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(data: Iterable[Any], *, max_batches: int | None = None) -> str | None:
    """SHA-256 of the batches' content (every tensor's bytes, shape and dtype, and the structure around
    them), or None when the data cannot be identified without consuming it.

    Only a sequence (a list or tuple of batches) is read: its batches may be tensors, numpy arrays,
    plain scalars or strings, and tuples, lists or dicts of these. An iterator, a generator, a DataLoader
    (which may shuffle or augment on every pass) or a batch of any other type gives None. With
    ``max_batches`` only the batches an audit would read count.
    """
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        return None
    digest = hashlib.sha256()
    try:
        for count, batch in enumerate(islice(data, max_batches)):
            digest.update(f"batch {count}:".encode())
            _digest_value(digest, batch)
    except _Unidentifiable:
        return None
    return digest.hexdigest()


class _Unidentifiable(Exception):
    """A batch holds a value whose content cannot be read into a digest."""


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _digest_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        _digest_tensor(digest, value)
    elif isinstance(value, Mapping):
        digest.update(f"dict:{len(value)}{{".encode())
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                raise _Unidentifiable(type(key).__name__)
            digest.update(f"{type(key).__name__}:{key!r}=".encode())
            _digest_value(digest, item)
        digest.update(b"}")
    elif isinstance(value, tuple | list):
        digest.update(f"{type(value).__name__}:{len(value)}(".encode())
        for item in value:
            _digest_value(digest, item)
        digest.update(b")")
    elif isinstance(value, _SCALARS):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        digest.update(f"ndarray:{value.dtype}:{tuple(value.shape)}:".encode())
        digest.update(value.tobytes(order="C"))
    else:
        raise _Unidentifiable(type(value).__name__)


def _digest_tensor(digest: Any, tensor: torch.Tensor) -> None:
    if tensor.layout is not torch.strided or tensor.is_nested:
        raise _Unidentifiable(f"a {tensor.layout} tensor")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"tensor:{flat.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())


@dataclass
class AuditCache:
    """Audits models, each once per (model object, weights, data, options); optionally keeps each report.

    Used by the pytest plugin's ``activation_audit`` fixture (one cache per test session). A model is
    keyed by identity *and* weight fingerprint, so a test that trains the model gets a fresh audit; the
    data by the content of its batches (:func:`data_fingerprint`), so the same model audited on another
    dataset gets its own report. Data that cannot be identified without consuming it (an iterator, a
    generator, a DataLoader) is audited on every call, never cached. The cache holds a reference to
    every model it audited so that an id is never reused within a session.
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
        data_key = data_fingerprint(data, max_batches=max_batches)
        key = (id(model), model_fingerprint(model), data_key, tuple(select or ()), eps, delta, max_batches, id(adapter))
        if data_key is not None and key in self._entries:
            return self._entries[key][1]
        from deadneuron.audit import audit

        report = audit(model, data, select=select, eps=eps, delta=delta, max_batches=max_batches,
                       adapter=adapter, meta={"source": type(model).__name__})  # fmt: skip
        self.audits += 1
        if data_key is not None:
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


__all__ = ["AuditCache", "assert_healthy", "assert_sparsity_below", "data_fingerprint", "model_fingerprint"]
