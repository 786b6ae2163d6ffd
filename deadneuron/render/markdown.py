"""Markdown rendering of a Report, and the plain facts every renderer shows (terminal, Markdown, HTML).

``summary_facts`` and ``finding_lines`` are the single source of the headline figures and the findings'
text, so that the three renderings of one report never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deadneuron.report import Report, SiteHealth
from deadneuron.rules.common import pct as share_text
from deadneuron.rules.common import plural
from deadneuron.rules.finding import Finding


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else share_text(x)


def ids_text(ids: Sequence[int], limit: int = 24) -> str:
    """The first ``limit`` ids and how many more; never "and 1 more", which takes the room of the id."""
    if len(ids) <= limit + 1:
        return ", ".join(map(str, ids))
    return ", ".join(map(str, ids[:limit])) + f" and {len(ids) - limit} more"


GUESSED_MARK = "?"


def channels_cell(s: SiteHealth) -> str:
    """The channel count, marked where the site's channel axis was guessed."""
    return f"{s.channels}{GUESSED_MARK}" if s.axis_source == "guessed" else str(s.channels)


def axis_legend(report: Report, *, code: Callable[[str], str] = str) -> str | None:
    """The line under a site table that explains the mark (None when no site's axis was guessed);
    ``code`` formats the option names."""
    if not any(s.axis_source == "guessed" for s in report.sites.values()):
        return None
    return (f"{GUESSED_MARK} channel axis guessed (no layer with a known layout produced the input): set it "
            f"with {code('--channel-axis GLOB=AXIS')} or {code('channel_axis={GLOB: AXIS}')}")


def source_of(report: Report) -> str:
    return str(report.meta.get("source") or report.meta.get("model") or "model")


def accuracy_text(metrics: Mapping[str, float]) -> str | None:
    """Reconstruction accuracy beside the trivial baseline (None when the report has none)."""
    if "valid_pixel_accuracy" not in metrics:
        return None
    text = f"{pct(metrics['valid_pixel_accuracy'])} of valid pixels"
    base = metrics.get("baseline_valid_pixel_accuracy")
    if base is not None:
        text += f" (most-common-colour baseline {pct(base)})"
    exact = metrics.get("exact_grid_accuracy")
    if exact is not None:
        text += f"; {pct(exact)} of grids exact"
    return text


def slots_text(report: Report) -> str | None:
    sl = report.slots
    if sl is None:
        return None
    never = ", ".join(map(str, sl.never_used)) or "none"
    return (
        f"{sl.mean_active:.2f} active per image of {sl.num_slots} (argmax-only {sl.mean_argmax_active:.2f}, "
        f"mass>=5% {sl.mean_mass_active:.2f}); largest slot takes {pct(sl.largest_slot_share)}, "
        f"mask entropy {sl.mask_entropy:.2f}; never used: {never}"
    )


def mask_text(report: Report) -> str | None:
    """Which padding mask the audit used, at how many sites it applied and how much it left out, and the
    sites it did not fit (any padding in them is counted; each site's ``masked`` says which); None when no
    mask was used."""
    source = report.meta.get("mask")
    if not source:
        return None
    sites = list(report.sites.values())
    masked = [s for s in sites if s.masked]
    text = f"{source} masked {len(masked)} of {plural(len(sites), 'site')}"
    if masked:
        text += f" (<= {max(s.excluded for s in masked)} padded elements/channel)"
    others = [s.name for s in sites if not s.masked]
    if len(others) == 1:
        text += f"; not {others[0]} (its shape does not fit)"
    return text + placement_text(report.meta.get("mask_dims"))


_HOW = {"stated": " (as set)", "adapter": " (as its adapter sets it)", "guessed": " (a guess: see the warnings)",
        "flattened": " (N x positions flattened there, batch first)",
        "misplaced": " (wrong on some batches: see the warnings)"}  # fmt: skip


def placement_text(placed: Any) -> str:
    """Where the mask lay on the sites whose placement was a choice (``report.meta["mask_dims"]``): the
    other sites were read batch first, as the shapes said."""
    if not isinstance(placed, Mapping) or not placed:
        return ""
    said: dict[str, list[str]] = {}  # sites placed alike, named together
    for site, p in placed.items():
        if isinstance(p, Mapping):
            fold = f", {p['fold']} rows per sample" if isinstance(p.get("fold"), int) and p["fold"] > 1 else ""
            said.setdefault(f"on dims ({', '.join(map(str, p.get('dims', ())))}){fold}{_HOW.get(str(p.get('how')), '')}",
                            []).append(site)  # fmt: skip
    items = [f"{', '.join(sites[:3])}{f' and {len(sites) - 3} more' if len(sites) > 3 else ''} {how}" for how, sites in said.items()]
    more = f" and {len(items) - 3} more placements" if len(items) > 3 else ""
    return "; " + ", ".join(items[:3]) + more


def dead_where(report: Report) -> str:
    """`` in 2 of 11 sites`` where channels are dead, else `` (of 11 sites)`` (`` (of 1 site)``)."""
    sm = report.summary
    of = plural(sm.sites, "site")
    return f" in {len(sm.dead_sites)} of {of}" if sm.dead else f" (of {of})"


def summary_facts(report: Report) -> list[tuple[str, str]]:
    """(label, text) rows of the headline figures."""
    sm = report.summary
    where = dead_where(report)
    rows = [
        ("sparsity", f"{pct(sm.sparsity)} (exact zeros over all activation elements)"),
        ("flat", f"{pct(sm.flat_fraction)} (pre-activations in the flat region)"),
        ("dead", f"{sm.dead} of {sm.channels} channels{where}"),
        ("dormant", f"{sm.dormant} (flat >= 99% of the time, not always)"),
    ]
    if sm.nonfinite:
        rows.append(("nonfinite", f"{sm.nonfinite} NaN/Inf activation elements"))
    slots = slots_text(report)
    if slots is not None:
        rows.append(("slots", slots))
    acc = accuracy_text(report.metrics)
    if acc is not None:
        rows.append(("accuracy", acc))
    mask = mask_text(report)
    if mask is not None:
        rows.append(("mask", mask))
    rows.append(("data", data_text(report)))
    return rows


def data_text(report: Report) -> str:
    """``3528 samples in 111 batches; eps=0.0, delta=0.05`` ("1 batch" for one)."""
    meta = report.meta

    def count(key: str, word: str, many: str) -> str:
        n = meta.get(key)
        return plural(n, word, many) if isinstance(n, int) else f"? {many}"

    return f"{count('samples', 'sample', 'samples')} in {count('batches', 'batch', 'batches')}; " \
           f"eps={meta.get('eps')}, delta={meta.get('delta')}"


def by_severity(findings: Sequence[Finding]) -> list[Finding]:
    """The findings most severe first, in their order within a severity."""
    return sorted(findings, key=lambda f: -f.severity.rank)


def finding_lines(f: Finding) -> tuple[str, str, str, list[str]]:
    """(severity, title, message, commands) of a finding."""
    return f.severity.value, f.title, f.message, list(f.commands)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _site_row(s: SiteHealth, with_nonfinite: bool) -> list[object]:
    row: list[object] = [
        f"`{s.name}`", s.label, channels_cell(s), pct(s.sparsity), pct(s.flat_fraction),
        len(s.dead_channels), len(s.dormant_channels),
    ]  # fmt: skip
    if with_nonfinite:
        row.append(s.nonfinite)
    return row


def _sites_section(report: Report) -> list[str]:
    with_nonfinite = any(s.nonfinite for s in report.sites.values())
    header = ["site", "kind", "channels", "sparsity", "flat", "dead", "dormant"]
    header += ["nonfinite"] if with_nonfinite else []
    align = "llrrrrr" + ("r" if with_nonfinite else "")
    rows = [_site_row(s, with_nonfinite) for s in report.sites.values()]
    lines = ["## Sites", "", *_table(header, rows, align), ""]
    legend = axis_legend(report, code=lambda t: f"`{t}`")
    lines += [legend, ""] if legend else []
    listed = [s for s in report.sites.values() if s.dead_channels or s.dormant_channels]
    for s in listed:
        parts = []
        if s.dead_channels:
            parts.append(f"dead channels {ids_text(s.dead_channels)}")
        if s.dormant_channels:
            parts.append(f"dormant channels {ids_text(s.dormant_channels)}")
        lines.append(f"- `{s.name}`: " + "; ".join(parts))
    return [*lines, ""] if listed else lines


def _findings_section(report: Report) -> list[str]:
    if not report.findings:
        return []
    lines = ["## Findings", ""]
    for f in by_severity(report.findings):
        severity, title, message, commands = finding_lines(f)
        lines.append(f"- **[{severity}] {title}**" + (f": {message}" if message else ""))
        lines += [f"  - try: `{c}`" for c in commands]
    return [*lines, ""]


def _slots_section(report: Report) -> list[str]:
    sl = report.slots
    if sl is None:
        return []
    usage = [(k, pct(u)) for k, u in enumerate(sl.slot_usage)]
    hist = [(k, n) for k, n in enumerate(sl.active_histogram)]
    lines = ["## Slots", "", slots_text(report) or "", ""]
    lines += [*_table(["slot", "active in images"], usage, "rr"), ""]
    lines += [*_table(["active slots", "images"], hist, "rr"), ""]
    if sl.duplicate_pairs:
        pairs = ", ".join(f"{j} and {k} (IoU {iou:.2f})" for j, k, iou in sl.duplicate_pairs)
        lines += [f"Duplicate slots: {pairs}", ""]
    return lines


def _metrics_section(report: Report) -> list[str]:
    if not report.metrics:
        return []
    rows = [(k, f"{v:.4f}") for k, v in report.metrics.items()]
    return ["## Metrics", "", *_table(["metric", "value"], rows, "lr"), ""]


def _figures_section(figures: Mapping[str, str]) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for path, title in figures.items():
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return lines


def render_markdown(report: Report, *, figures: Mapping[str, str] | None = None) -> str:
    """The report as Markdown; ``figures`` maps relative image paths to their titles."""
    lines = [f"# deadneuron audit: `{source_of(report)}`", ""]
    lines += [*_table(["", ""], summary_facts(report), "ll"), ""]
    lines += [f"> **warning:** {w}" for w in report.warnings]
    lines += [""] if report.warnings else []
    lines += _findings_section(report)
    lines += _sites_section(report)
    lines += _slots_section(report)
    lines += _metrics_section(report)
    lines += _figures_section(figures or {})
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = ["axis_legend", "by_severity", "channels_cell", "finding_lines", "mask_text", "render_markdown", "summary_facts"]
