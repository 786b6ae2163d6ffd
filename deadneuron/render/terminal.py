"""Rich terminal rendering of a Report: a summary panel, the site table, slots, metrics, findings.

Plain text when piped or under NO_COLOR (rich handles both); fits 80 columns by folding names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deadneuron.report import Report, SiteHealth

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _count_cell(k: int, style: str) -> Text:
    return Text(str(k), style=style if k else "dim")


def site_table(report: Report) -> Table:
    table = Table(title="Activation sites", title_justify="left", expand=False, pad_edge=False)
    table.add_column("site", overflow="fold", ratio=3)
    table.add_column("kind", overflow="fold")
    table.add_column("ch", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("flat", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("dormant", justify="right")
    table.add_column("nonfinite", justify="right")
    for s in report.sites.values():
        style = "bold red" if s.dead_channels else ("red" if s.nonfinite else "")
        table.add_row(
            Text(s.name, style=style),
            s.label,
            str(s.channels),
            _pct(s.sparsity),
            _pct(s.flat_fraction),
            _count_cell(len(s.dead_channels), "bold red"),
            _count_cell(len(s.dormant_channels), "yellow"),
            _count_cell(s.nonfinite, "bold red"),
        )
    return table


def _summary_lines(report: Report) -> list[Text]:
    sm = report.summary
    lines = [
        Text.assemble(
            ("sparsity ", "bold"), _pct(sm.sparsity), "  (exact zeros over all activation elements)\n",
            ("flat     ", "bold"), _pct(sm.flat_fraction), "  (pre-activations in the flat region)\n",
            ("dead     ", "bold"), (f"{sm.dead}", "bold red" if sm.dead else ""), f" of {sm.channels} channels",
            (f" in {len(sm.dead_sites)} of {sm.sites} sites" if sm.dead else f" in {sm.sites} sites"), "\n",
            ("dormant  ", "bold"), f"{sm.dormant}", "  (flat >= 99% of the time, not always)",
        )  # fmt: skip
    ]
    if report.slots is not None:
        sl = report.slots
        lines.append(
            Text.assemble(
                ("\nslots    ", "bold"),
                f"{sl.mean_active:.2f} active per image of {sl.num_slots}",
                f" (argmax-only {sl.mean_argmax_active:.2f}, mass>=5% {sl.mean_mass_active:.2f}; largest share "
                f"{_pct(sl.largest_slot_share)}, mask entropy {sl.mask_entropy:.2f}",
                f"; never used: {', '.join(map(str, sl.never_used)) or 'none'})",
            )
        )
    m = report.metrics
    if "valid_pixel_accuracy" in m:
        base = m.get("baseline_valid_pixel_accuracy")
        beside = f" vs {_pct(base)} for the most-common-colour baseline" if base is not None else ""
        lines.append(Text.assemble(("\naccuracy ", "bold"), _pct(m["valid_pixel_accuracy"]), " of valid pixels", beside))
    meta = report.meta
    lines.append(
        Text(f"\non {meta.get('samples', '?')} samples in {meta.get('batches', '?')} batches; eps={meta.get('eps')}, "
             f"delta={meta.get('delta')}", style="dim")
    )  # fmt: skip
    return lines


def summary_panel(report: Report) -> Panel:
    source = report.meta.get("source") or report.meta.get("model", "model")
    return Panel(Group(*_summary_lines(report)), title=f"deadneuron audit: {source}", title_align="left")


def slot_table(report: Report) -> Table | None:
    sl = report.slots
    if sl is None:
        return None
    t = Table(title="Slots", title_justify="left", pad_edge=False)
    t.add_column("slot", justify="right")
    t.add_column("used in images", justify="right")
    for k, u in enumerate(sl.slot_usage):
        t.add_row(str(k), Text(_pct(u), style="dim" if u == 0 else ""))
    return t


def findings_block(findings: tuple[Mapping[str, Any], ...]) -> Group | None:
    if not findings:
        return None
    items: list[Any] = [Text("Findings", style="bold underline")]
    for f in findings:
        sev = str(f.get("severity", "info"))
        items.append(Text.assemble((f"[{sev}] ", SEVERITY_STYLE.get(sev, "")), (str(f.get("title", "")), "bold")))
        if f.get("message"):
            items.append(Text("  " + str(f["message"])))
        for cmd in f.get("commands", ()):
            items.append(Text("  try: " + str(cmd), style="green"))
    return Group(*items)


def render(report: Report, console: Console) -> None:
    """Print the whole report."""
    console.print(summary_panel(report))
    for w in report.warnings:
        console.print(Text("warning: " + w, style="yellow"))
    console.print(site_table(report))
    for s in report.sites.values():
        if s.dead_channels:
            console.print(Text.assemble(("dead ", "bold red"), f"{s.name}: channels {_ids(s.dead_channels)}"))
        if s.dormant_channels:
            console.print(Text.assemble(("dormant ", "yellow"), f"{s.name}: channels {_ids(s.dormant_channels)}"))
    slots = slot_table(report)
    if slots is not None:
        console.print(slots)
    block = findings_block(report.findings)
    if block is not None:
        console.print(block)


def _ids(ids: tuple[int, ...], limit: int = 24) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def site_line(s: SiteHealth) -> str:
    return f"{s.name}: sparsity {_pct(s.sparsity)}, flat {_pct(s.flat_fraction)}, dead {len(s.dead_channels)}/{s.channels}"
