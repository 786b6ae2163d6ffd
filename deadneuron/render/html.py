"""A self-contained HTML page of a Report: inline CSS, figures embedded as base64 PNGs, no scripts, no
external resources, so that it opens from disk or as an e-mail attachment."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape

from deadneuron.render.markdown import (
    axis_legend,
    by_severity,
    channels_cell,
    finding_lines,
    ids_text,
    pct,
    slots_text,
    source_of,
    summary_facts,
)
from deadneuron.report import Report

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
code { font: 0.92em ui-monospace, SFMono-Regular, Menlo, monospace; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { color: #555; font-weight: 600; }
tr.dead td:first-child { color: #b0281a; font-weight: 600; } tr.dormant td:first-child { color: #a06c00; }
.sev { display: inline-block; min-width: 5.5em; font-weight: 600; }
.sev-error, .sev-critical { color: #b0281a; } .sev-warning { color: #a06c00; } .sev-info { color: #1f6fa5; }
.warning { background: #fff6e0; border-left: 4px solid #f0b429; padding: 0.4em 0.8em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
"""


def _facts(report: Report) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary_facts(report))
    return f'<table class="facts">{rows}</table>'


def _sites(report: Report) -> str:
    head = "".join(
        f'<th class="{"num" if i > 1 else ""}">{h}</th>'
        for i, h in enumerate(("site", "kind", "channels", "sparsity", "flat", "dead", "dormant", "nonfinite"))
    )
    rows = []
    for s in report.sites.values():
        cls = "dead" if s.dead_channels else ("dormant" if s.dormant_channels else "")
        cells = [len(s.dead_channels), len(s.dormant_channels), s.nonfinite]
        nums = [channels_cell(s), pct(s.sparsity), pct(s.flat_fraction), *cells]
        rows.append(
            f'<tr class="{cls}"><td><code>{escape(s.name)}</code></td><td>{escape(s.label)}</td>'
            + "".join(f'<td class="num">{escape(str(v))}</td>' for v in nums)
            + "</tr>"
        )
    listed = [
        f"<li><code>{escape(s.name)}</code>: "
        + "; ".join(
            part
            for part in (
                f"dead channels {ids_text(s.dead_channels)}" if s.dead_channels else "",
                f"dormant channels {ids_text(s.dormant_channels)}" if s.dormant_channels else "",
            )
            if part
        )
        + "</li>"
        for s in report.sites.values()
        if s.dead_channels or s.dormant_channels
    ]
    extra = f"<ul>{''.join(listed)}</ul>" if listed else ""
    legend = axis_legend(report, code=lambda t: f"<code>{escape(t)}</code>")
    extra = (f'<p class="warning">{legend}</p>' if legend else "") + extra
    return f"<h2>Sites</h2><table><tr>{head}</tr>{''.join(rows)}</table>{extra}"


def _findings(report: Report) -> str:
    if not report.findings:
        return ""
    items = []
    for f in by_severity(report.findings):
        severity, title, message, commands = finding_lines(f)
        tries = "".join(f"<br>try: <code>{escape(c)}</code>" for c in commands)
        items.append(
            f'<li><span class="sev sev-{escape(severity)}">[{escape(severity)}]</span> <strong>{escape(title)}</strong>'
            f"{': ' + _with_code(message) if message else ''}{tries}</li>"
        )
    return f"<h2>Findings</h2><ul>{''.join(items)}</ul>"


def _with_code(text: str) -> str:
    """Escaped text whose `backquoted` spans (flags, commands in a finding's message) are set as code."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backquote: the text as it is
        return escape(text)
    return "".join(f"<code>{escape(p)}</code>" if i % 2 else escape(p) for i, p in enumerate(parts))


def _slots(report: Report) -> str:
    sl = report.slots
    if sl is None:
        return ""
    usage = "".join(f'<tr><td class="num">{k}</td><td class="num">{escape(pct(u))}</td></tr>' for k, u in enumerate(sl.slot_usage))
    return (
        f"<h2>Slots</h2><p>{escape(slots_text(report) or '')}</p>"
        f'<table><tr><th class="num">slot</th><th class="num">active in images</th></tr>{usage}</table>'
    )


def _metrics(report: Report) -> str:
    if not report.metrics:
        return ""
    rows = "".join(f'<tr><td>{escape(k)}</td><td class="num">{v:.4f}</td></tr>' for k, v in report.metrics.items())
    return f"<h2>Metrics</h2><table>{rows}</table>"


def _figures(figures: Mapping[str, bytes]) -> str:
    if not figures:
        return ""
    parts = []
    for title, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(title)}</figcaption></figure>"
        )
    return "<h2>Figures</h2>" + "".join(parts)


def render_html(report: Report, *, figures: Mapping[str, bytes] | None = None) -> str:
    """The page; ``figures`` maps a title to PNG bytes (embedded as data: URIs)."""
    title = f"deadneuron audit: {source_of(report)}"
    warnings = "".join(f'<p class="warning">warning: {escape(w)}</p>' for w in report.warnings)
    body = (
        f"<h1>{escape(title)}</h1>{_facts(report)}{warnings}{_findings(report)}{_sites(report)}"
        f"{_slots(report)}{_metrics(report)}{_figures(figures or {})}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n"
    )


__all__ = ["render_html"]
