"""What the trainer callbacks share: a writer that hands each snapshot's figures to a trainer's logger,
and the findings logged at the end of training."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deadneuron.integrations.writers import snapshot_metrics
from deadneuron.snapshot import ChannelDetail, Snapshot

if TYPE_CHECKING:
    from deadneuron.monitor import Monitor
    from deadneuron.rules import Finding

# Figures a callback logs per site by default (every figure: `deadneuron.integrations.writers.SCALARS`).
LOGGED = ("dead", "dormant", "tau_dormant", "not_learning", "flat_fraction", "grad_nonzero")


def checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a callback passes on to `deadneuron.Monitor`, minus what the trainer provides."""
    taken = {"optimizer", "every", "sample_every", "start_step"} & set(options)
    if taken:
        from deadneuron.errors import UsageError

        raise UsageError(f"the callback sets {', '.join(sorted(taken))} itself; pass every/sample_every by name")
    return {k: v for k, v in options.items() if k != "writers"}


class MetricsWriter:
    """A `deadneuron.monitor.SnapshotWriter` calling ``log(metrics, snapshot)`` with `snapshot_metrics`."""

    def __init__(self, log: Callable[[dict[str, float], Snapshot], None], *, prefix: str, keys: Sequence[str]) -> None:
        snapshot_metrics(Snapshot(0, 0, 0, None, {}), prefix=prefix, keys=keys)  # a bad key fails now
        self._log = log
        self.prefix = prefix
        self.keys = tuple(keys)

    def write(self, snapshot: Snapshot, channels: Mapping[str, ChannelDetail]) -> None:
        self._log(snapshot_metrics(snapshot, prefix=self.prefix, keys=self.keys), snapshot)

    def close(self) -> None:
        return None


def end_of_training(monitor: Monitor, logger: logging.Logger) -> list[Finding]:
    """The findings over the monitor's timeline, logged (`log_findings`); where no snapshot was recorded, one
    warning saying so (an empty list of findings is no clean bill of health)."""
    if monitor.snapshots:
        findings = monitor.findings()
        log_findings(findings, logger)
        return findings
    why = "; ".join(monitor.warnings) or "no training forward pass ran (no optimizer step, or every batch was skipped)"
    logger.warning("deadneuron: no health snapshot was recorded over this run (%d optimizer steps): %s",
                   monitor.steps, why)  # fmt: skip
    return []


def log_findings(findings: Sequence[Finding], logger: logging.Logger) -> None:
    """One log record per finding: warnings and errors as warnings, the rest as info."""
    from deadneuron.rules import Severity

    for f in findings:
        level = logging.WARNING if f.severity >= Severity.WARNING else logging.INFO
        logger.log(level, "deadneuron %s [%s]: %s", f.severity.value, f.rule, f.message)
