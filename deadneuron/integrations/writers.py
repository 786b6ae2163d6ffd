"""Writers of the training monitor's snapshots: JSONL, CSV and TensorBoard; and `read_log`, which reads a
JSONL or CSV log back as health-timeline entries (``deadneuron timeline LOG`` draws them).

The plain-file writers append each snapshot with a single ``write`` to a file opened ``O_APPEND``, so an
interrupted run leaves whole lines before, at most, one cut last line, which `read_log` skips with a
warning. They open the file per snapshot: a log can be resumed by another run, and nothing is held open
between snapshots. A run that appends to a log whose last line was cut ends that line first, so the cut
record stays a line of its own, which `read_log` skips with a warning wherever it lies.

* JSONL: one line per snapshot, the health-timeline entry (`deadneuron.snapshot.Snapshot.to_dict`).
* CSV: one row per (snapshot step, site): the columns of `deadneuron.render.timeline`, and the dead
  channel ids separated by spaces.
* TensorBoard (``torch.utils.tensorboard``, needs the ``tensorboard`` package): per site, the scalars of
  `snapshot_metrics` under ``deadneuron/<figure>/<site>``, and a histogram of per-channel firing rates.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deadneuron.errors import UnreadableInputError, UsageError, WriteError
from deadneuron.render.timeline import ENTRY_COLUMNS, SITE_COLUMNS
from deadneuron.snapshot import MEASURED_ON, ChannelDetail, Snapshot

CSV_COLUMNS = (*ENTRY_COLUMNS, "site", *SITE_COLUMNS, "dead_channels")
SCALARS = ("dead", "dormant", "tau_dormant", "not_learning", "flat_fraction", "sparsity", "grad_nonzero",
            "grad_abs_mean", "abs_mean", "abs_max", "nonfinite")  # fmt: skip


def snapshot_metrics(snapshot: Snapshot, *, prefix: str = "deadneuron",
                     keys: Sequence[str] = SCALARS) -> dict[str, float]:  # fmt: skip
    """Flat ``{"<prefix>/<figure>/<site>": value}`` of a snapshot for the figures ``keys`` (measured, finite
    values only: a figure not measured, as ``not_learning`` where no gradient reached a site, is left out,
    never logged as 0), with the totals over all sites under ``<prefix>/<figure>/all`` for the channel
    counts (left out where some site's count was not measured)."""
    unknown = [k for k in keys if k not in SCALARS]
    if unknown:
        raise UsageError(f"unknown monitor figure {unknown[0]!r}; choose from {', '.join(SCALARS)}")
    out: dict[str, float] = {}
    for site, s in snapshot.sites.items():
        for key in keys:
            value = getattr(s, key)
            if value is not None and math.isfinite(float(value)):
                out[f"{prefix}/{key}/{site}"] = float(value)
    for key in (k for k in ("dead", "dormant", "tau_dormant", "not_learning") if k in keys):
        counts = [getattr(s, key) for s in snapshot.sites.values()]
        if None not in counts:
            out[f"{prefix}/{key}/all"] = float(sum(counts))
    return out


def _ends_cut(path: Path) -> bool:
    """Whether the file at ``path`` ends inside a line (a write cut by a crash): not empty, no final newline."""
    try:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def _append(path: Path, data: str) -> None:
    if _ends_cut(path):  # a crashed run's last line: end it, so that this record is not glued to it
        data = "\n" + data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(f"cannot append to the monitor log {path}: {exc.strerror}") from exc


def _check_folder(path: Path) -> Path:
    if path.is_dir():
        raise UsageError(f"monitor log {path} is a folder: give a file path")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write the monitor log {path}: folder {path.parent} does not exist")
    return path


class JsonlWriter:
    """One JSON line per snapshot, appended to ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _check_folder(Path(path))

    def write(self, snapshot: Snapshot, channels: Mapping[str, ChannelDetail]) -> None:
        _append(self.path, json.dumps(snapshot.to_dict(), allow_nan=False) + "\n")

    def close(self) -> None:
        return None


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


class CsvWriter:
    """One row per (snapshot step, site), appended to ``path``; the header is written once. An existing
    file with another header is refused (UsageError) rather than mixed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _check_folder(Path(path))
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CSV_COLUMNS:
                raise UsageError(f"{self.path} is a CSV file with other columns: choose another monitor log path")

    def write(self, snapshot: Snapshot, channels: Mapping[str, ChannelDetail]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not self.path.is_file() or not self.path.stat().st_size:
            w.writerow(CSV_COLUMNS)
        entry = snapshot.to_dict()
        for site, s in entry["sites"].items():
            row = {**entry, **s, "site": site, "dead_channels": " ".join(str(c) for c in s["dead_channels"])}
            w.writerow([_csv_cell(row.get(c)) for c in CSV_COLUMNS])
        _append(self.path, buf.getvalue())

    def close(self) -> None:
        return None


class TensorBoardWriter:
    """Scalars per site and a histogram of per-channel firing rates, through a ``SummaryWriter`` (yours, or
    one made on ``log_dir``). Closing closes only a writer made here."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None,
                 prefix: str = "deadneuron") -> None:  # fmt: skip
        self._owned = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("the TensorBoard writer needs the tensorboard package: pip install tensorboard") from None
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer
        self.prefix = prefix

    def write(self, snapshot: Snapshot, channels: Mapping[str, ChannelDetail]) -> None:
        for tag, value in snapshot_metrics(snapshot, prefix=self.prefix).items():
            self.writer.add_scalar(tag, value, snapshot.step)
        for site, detail in channels.items():
            if detail.firing.size:
                self.writer.add_histogram(f"{self.prefix}/firing_rate/{site}", detail.firing, snapshot.step)
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()


# -- reading a log back ------------------------------------------------------------------------------------


def read_log(path: str | os.PathLike[str], *, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The health-timeline entries of a JSONL or CSV monitor log (told apart by the first character)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableInputError(f"{path}: no such monitor log") from None
    except IsADirectoryError:
        raise UnreadableInputError(f"{path}: is a folder, not a monitor log; give the JSONL or CSV file inside it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableInputError(f"{path}: cannot read it ({exc})") from None
    if not text.strip():
        raise UnreadableInputError(f"{path}: the monitor log is empty")
    try:
        if text.lstrip().startswith("{"):
            return _read_jsonl(path, text, warn)
        return _read_csv(path, text, warn)
    except (RecursionError, csv.Error) as exc:  # a record deeper than json.loads goes, a field beyond csv's limit
        why = "a record nested too deeply" if isinstance(exc, RecursionError) else f"csv: {str(exc)[:120]}"
        raise UnreadableInputError(f"{path}: not a deadneuron monitor log ({why}); give the log a Monitor wrote") from None


def _skip_cut(path: Path, what: str, warn: Callable[[str], None] | None) -> None:
    if warn is not None:
        warn(f"{path}: {what} is cut short (an interrupted write); it is skipped")


def _read_jsonl(path: Path, text: str, warn: Callable[[str], None] | None) -> list[dict[str, Any]]:
    lines = text.splitlines()
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            # a run cut short while appending: the last line, or (a resumed run appended after it) a
            # record begun and not finished
            if (number == len(lines) and not text.endswith("\n")) or (entries and line.startswith("{")):
                _skip_cut(path, f"line {number}", warn)
                continue
            raise UnreadableInputError(f"{path}: line {number} is not JSON: not a deadneuron monitor log") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("sites"), dict) or "step" not in entry:
            raise UnreadableInputError(f"{path}: line {number} is no timeline entry (needs step and sites)")
        entries.append(entry)
    return entries


def _number(text: str) -> float | int | None:
    if text == "":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _cut_row(row: Mapping[Any, Any], *, last: bool, text: str) -> bool:
    """A row that a crash cut short: missing or extra fields (a resumed run's row glued on), the file's last
    row without its newline, or fewer dead channel ids than its dead count."""
    if None in row or any(v is None for v in row.values()) or (last and not text.endswith("\n")):
        return True
    ids, dead = (row.get("dead_channels") or "").split(), row.get("dead") or ""
    return "dead_channels" in row and dead.isdigit() and len(ids) != int(dead)


def _read_csv(path: Path, text: str, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("step", "site", "dead") if c not in (reader.fieldnames or ())]
    if missing:
        raise UnreadableInputError(f"{path}: not a deadneuron monitor log (no column {', '.join(missing)})")
    rows = list(reader)
    entries: dict[int, dict[str, Any]] = {}
    for number, row in enumerate(rows, 2):
        if _cut_row(row, last=number == len(rows) + 1, text=text):
            _skip_cut(path, f"row {number}", warn)
            continue
        try:
            step = int(float(row["step"]))
            values = {k: (v if k in ("kind", "site") else _number(v or "")) for k, v in row.items()
                      if k in CSV_COLUMNS and k != "dead_channels"}  # fmt: skip
            ids = [int(c) for c in (row.get("dead_channels") or "").split()]
        except (TypeError, ValueError):
            raise UnreadableInputError(f"{path}: row {number} has a value that is not a number") from None
        entry = entries.setdefault(step, {**{k: values.get(k) for k in ENTRY_COLUMNS}, "measured_on": MEASURED_ON,
                                          "sites": {}})  # fmt: skip
        site = {k: v for k, v in values.items() if k in SITE_COLUMNS}
        if "dead_channels" in row:
            site["dead_channels"] = ids
        entry["sites"][str(row["site"])] = site
    return [entries[s] for s in sorted(entries)]


__all__ = ["CSV_COLUMNS", "SCALARS", "CsvWriter", "JsonlWriter", "TensorBoardWriter", "read_log", "snapshot_metrics"]
