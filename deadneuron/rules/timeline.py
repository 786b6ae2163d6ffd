"""Reading a checkpoint's training history and health timeline, tolerant of missing keys.

A timeline entry (``arc_model.train``) looks like ``{"epoch", "step", "sites": {site: {"dead": int,
"dead_channels": [int] | None, "sparsity", "flat_fraction"}}, "slots", "metrics"}``; a history record like
``{"epoch", "step", "loss", "train_accuracy", "heldout_accuracy" (None between timeline points)}``.
The timeline is measured on its own probe set, so its figures are compared with each other, never with
the audit's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_TRAIN_ACC = ("train_accuracy", "train_valid_pixel_accuracy", "train_acc", "accuracy")
_HELDOUT_ACC = ("heldout_accuracy", "heldout_valid_pixel_accuracy", "val_accuracy", "valid_accuracy", "val_acc")


Window = tuple[int, int]  # the steps an entry covers, both ends included


@dataclass(frozen=True)
class DeadHistory:
    """Fate of one site's channels over the timeline: dead at init, died in training, revived.

    Steps are those an entry measured: a monitor's snapshot covers its window, steps ``first_step`` to
    ``step - 1`` (``step`` counts the steps done when it was taken); an entry without ``first_step`` (a
    probe-set point) covers its ``step`` only."""

    at_init: tuple[int, ...]  # dead at the first entry and still dead at the last (at init if it starts at step 0)
    died: tuple[int, ...]  # dead at the last entry, not at the first
    revived: tuple[int, ...]  # dead at some entry, alive at the last
    died_windows: tuple[Window, ...]  # the window of the entry that first saw each channel of ``died`` dead
    first_window: Window
    last_window: Window

    @property
    def died_steps(self) -> tuple[int, ...]:
        """The first step of the window that first saw each channel of ``died`` dead: dead since then."""
        return tuple(lo for lo, _ in self.died_windows)

    @property
    def first_step(self) -> int:
        return self.first_window[0]

    @property
    def last_step(self) -> int:
        return self.last_window[1]


@dataclass(frozen=True)
class AccuracyPoint:
    epoch: int
    train: float
    heldout: float


def _step(entry: Mapping[str, Any], index: int) -> int:
    step = entry.get("step", entry.get("epoch", index))
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else index


def window_of(entry: Mapping[str, Any], index: int) -> Window:
    """The steps ``entry`` measured: first_step..step-1 for a monitor's window, else its step alone."""
    step, first = _step(entry, index), entry.get("first_step")
    if isinstance(first, (int, float)) and not isinstance(first, bool) and int(first) < step:
        return int(first), step - 1
    return step, step


def at_steps(window: Window) -> str:
    """``"at step 40"`` for a point, ``"over steps 10-14"`` for a window."""
    lo, hi = window
    return f"at step {lo}" if lo == hi else f"over steps {lo}-{hi}"


def dead_from_start_text(window: Window) -> str:
    """How channels dead at a timeline's first entry are named: ``"dead at init"`` where that entry starts
    at step 0; else ``"dead since the first window measured (step N)"`` (a resumed run, a monitor started at
    ``start_step`` N): what happened to them before step N is not known."""
    lo, hi = window
    if lo == 0:
        return "dead at init"
    return f"dead since the first {'point' if lo == hi else 'window'} measured (step {lo})"


def _site_entry(entry: Mapping[str, Any], site: str) -> Mapping[str, Any] | None:
    sites = entry.get("sites")
    value = sites.get(site) if isinstance(sites, Mapping) else None
    return value if isinstance(value, Mapping) else None


def dead_set(entry: Mapping[str, Any], site: str) -> frozenset[int] | None:
    """Dead channel ids of ``site`` at one timeline entry (None when the entry has no list)."""
    value = _site_entry(entry, site)
    ids = value.get("dead_channels") if value is not None else None
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        return None
    return frozenset(int(c) for c in ids)


def dead_count(entry: Mapping[str, Any], site: str) -> int | None:
    value = _site_entry(entry, site)
    if value is None:
        return None
    ids = dead_set(entry, site)
    if ids is not None:
        return len(ids)
    count = value.get("dead")
    return int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) else None


def timeline_sites(timeline: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Sites present in both the first and the last entry."""
    if len(timeline) < 2:
        return ()
    first, last = timeline[0].get("sites"), timeline[-1].get("sites")
    if not isinstance(first, Mapping) or not isinstance(last, Mapping):
        return ()
    return tuple(s for s in last if s in first)


def dead_history(timeline: Sequence[Mapping[str, Any]], site: str) -> DeadHistory | None:
    """Per-channel fate of ``site``; None without at least two entries with channel lists."""
    entries = [(i, e, dead_set(e, site)) for i, e in enumerate(timeline)]
    entries = [(i, e, d) for i, e, d in entries if d is not None]
    if len(entries) < 2:
        return None
    first, last = entries[0][2], entries[-1][2]
    assert first is not None and last is not None
    ever: set[int] = set()
    first_seen: dict[int, Window] = {}
    for i, e, dead in entries:
        assert dead is not None
        ever |= dead
        for c in dead:
            first_seen.setdefault(c, window_of(e, i))
    died = tuple(sorted(last - first))
    return DeadHistory(
        at_init=tuple(sorted(first & last)),
        died=died,
        revived=tuple(sorted(ever - last)),
        died_windows=tuple(first_seen[c] for c in died),
        first_window=window_of(entries[0][1], entries[0][0]),
        last_window=window_of(entries[-1][1], entries[-1][0]),
    )


def dead_growth(timeline: Sequence[Mapping[str, Any]], sites: Sequence[str]) -> tuple[int, int] | None:
    """(dead at the first entry, dead at the last entry) summed over ``sites``; None if unknown."""
    first = [dead_count(timeline[0], s) for s in sites] if timeline else []
    last = [dead_count(timeline[-1], s) for s in sites] if timeline else []
    pairs = [(a, b) for a, b in zip(first, last, strict=True) if a is not None and b is not None]
    if len(timeline) < 2 or not pairs:
        return None
    return sum(a for a, _ in pairs), sum(b for _, b in pairs)


def _finite(record: Mapping[str, Any], names: Sequence[str]) -> float | None:
    for name in names:
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def accuracy_points(history: Sequence[Mapping[str, Any]]) -> list[AccuracyPoint]:
    """History records that have both a training and a held-out accuracy, in order."""
    points = []
    for index, record in enumerate(history):
        train, heldout = _finite(record, _TRAIN_ACC), _finite(record, _HELDOUT_ACC)
        if train is not None and heldout is not None:
            epoch = record.get("epoch", index + 1)
            points.append(AccuracyPoint(int(epoch) if isinstance(epoch, (int, float)) else index + 1, train, heldout))
    return points
