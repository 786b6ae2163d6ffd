"""Renderings of a :class:`~deadneuron.patch.verify.Verification`: a rich table and a Markdown table.

A cell is ``mean ± std`` over seeds (just the value with one seed); the change is patched minus
baseline (percentage points for shares). rich is imported inside the function that needs it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deadneuron.patch.verify import Row, Verdict, Verification, spread

if TYPE_CHECKING:
    from rich.table import Table

_VERDICT_STYLE = {
    Verdict.IMPROVED: "green",
    Verdict.WORSE: "red",
    Verdict.NO_CHANGE: "dim",
    Verdict.BY_DEFINITION: "yellow",
    Verdict.NOT_AVAILABLE: "dim",
    Verdict.REFERENCE: "dim",
}
_GROUP_TITLES = {"overall": "all sites", "slots": "slots", "task": "task", "metric": "--metric"}


def fmt_value(values: Sequence[float], unit: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    mean = statistics.fmean(finite)
    sd = spread(finite)
    scale, digits, suffix = _format(unit)
    text = f"{mean * scale:.{digits}f}"
    if len(finite) > 1:
        text += f" ± {sd * scale:.{digits}f}"
    return text + suffix


def fmt_change(row: Row) -> str:
    d = row.difference
    if not math.isfinite(d) or row.verdict is Verdict.REFERENCE:
        return ""
    scale, digits, _ = _format(row.spec.unit)
    suffix = " pp" if row.spec.unit == "share" else ""
    return f"{d * scale:+.{digits}f}{suffix}"


def _format(unit: str) -> tuple[float, int, str]:
    formats = {"count": (1.0, 1, ""), "share": (100.0, 1, "%"), "ratio": (1.0, 3, ""), "slots": (1.0, 2, ""),
               "loss": (1.0, 3, ""), "value": (1.0, 4, "")}  # fmt: skip
    return formats[unit]


def _count_format(values: Sequence[float]) -> bool:
    return all(float(v).is_integer() for v in values if math.isfinite(v))


def _cell(values: Sequence[float], unit: str) -> str:
    if unit == "count" and len(values) == 1 and _count_format(values):
        return f"{values[0]:.0f}"
    return fmt_value(values, unit)


def _reference(row: Row) -> str:
    return "" if row.reference is None else _cell((row.reference,), row.spec.unit)


def notes(v: Verification) -> list[str]:
    """The distinct notes of the rows, in order; a row's verdict cell refers to its note by number."""
    return list(dict.fromkeys(r.note for r in v.rows if r.note))


def _verdict(row: Row, numbered: list[str]) -> str:
    return row.verdict.value + (f" [{numbered.index(row.note) + 1}]" if row.note else "")


def has_reference(v: Verification) -> bool:
    return any(r.reference is not None for r in v.rows)


def header(v: Verification) -> list[str]:
    n = len(v.seeds)
    arms = [f"{v.labels[0]} ({n} seed{'s' if n > 1 else ''})", v.labels[1], "change", "verdict"]
    return ["where", "metric", *(["input"] if has_reference(v) else []), *arms]


def rows_text(v: Verification) -> list[list[str]]:
    out = []
    previous = None
    reference = has_reference(v)
    numbered = notes(v)
    for row in v.rows:
        where = _GROUP_TITLES.get(row.group, row.group) if row.group != previous else ""
        previous = row.group
        ref = [_reference(row)] if reference else []
        out.append([where, row.spec.label, *ref, _cell(row.baseline, row.spec.unit),
                    _cell(row.patched, row.spec.unit), fmt_change(row), _verdict(row, numbered)])  # fmt: skip
    return out


def budget_line(v: Verification) -> str:
    b = v.budget
    parts = [f"seeds {', '.join(map(str, v.seeds))}"] if b.get("steps") is not None or len(v.seeds) > 1 else []
    parts += [f"{k.replace('_', ' ')} {b[k]}" for k in ("init", "steps", "audit") if b.get(k) is not None]
    if b.get("seconds") is not None:
        parts.append(f"{float(b['seconds']) / 60:.1f} min wall time")
    return "; ".join(parts)


def verification_table(v: Verification) -> Table:
    """A rich Table of every row, verdicts coloured."""
    from rich.table import Table

    table = Table(title=f"{v.labels[0]} vs {v.labels[1]}: {budget_line(v)}", caption=_caption(v), title_justify="left",
                  caption_justify="left")
    names = header(v)
    for i, name in enumerate(names):
        table.add_column(name, justify="right" if 2 <= i < len(names) - 1 else "left", overflow="fold")
    for row, cells in zip(v.rows, rows_text(v), strict=True):
        style = _VERDICT_STYLE.get(row.verdict, "")
        table.add_row(*cells[:-1], f"[{style}]{cells[-1]}[/]" if style else cells[-1],
                      end_section=False)  # fmt: skip
    return table


def _caption(v: Verification) -> str:
    counts = v.counts()
    tally = ", ".join(f"{counts[k.value]} {k.value}" for k in Verdict if k.value in counts)
    claim = " One seed is not a claim: use --seeds 3." if len(v.seeds) < 2 else ""
    lines = [f"{tally}.{claim} A change counts when |mean difference| > max(tolerance, larger per-arm std)."]
    if has_reference(v):
        lines.append("input: the checkpoint as it was trained (its own budget).")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes(v), 1)]
    return "\n".join(lines)


def verification_markdown(v: Verification, *, sites: Sequence[str] | None = None) -> str:
    """A Markdown table (``sites`` limits the per-site rows; the overall, slot and task rows stay)."""
    keep = [r for r in v.rows if r.group in _GROUP_TITLES or sites is None or r.group in sites]
    shown = Verification(v.seeds, tuple(keep), v.budget, v.labels)
    names = header(shown)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * 2 + "---:|" * (len(names) - 3) + "---|"]
    for cells in rows_text(shown):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    caption = _caption(shown).replace("\n", "  \n")  # Markdown line breaks
    return "\n".join([f"Budget: {budget_line(v)}.", "", *lines, "", caption]) + "\n"


__all__ = ["budget_line", "fmt_change", "fmt_value", "verification_markdown", "verification_table"]
