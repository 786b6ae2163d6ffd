"""Write a report folder: report.json, report.md, report.html (self-contained) and PNG figures.

``write_report(report, out)`` draws what the Report alone holds. Given the model and its adapter it also
draws sample grids with their slot masks; given the checkpoint (a mapping with ``health_timeline`` and
``history``) the health timeline, whose raw entries it also keeps as ``timeline.json`` so that
``deadneuron report`` can draw it again. Every file is written atomically.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deadneuron.errors import WriteError
from deadneuron.report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Format = Literal["json", "md", "html", "png"]
FORMATS: tuple[Format, ...] = ("json", "md", "html", "png")
TIMELINE_FILE = "timeline.json"
SAMPLE_MIN_SIDE = 10  # draw slot samples from the first held-out batch of grids at least this big
SAMPLE_MAX_BATCHES = 400
Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def report_figures(report: Report) -> dict[str, tuple[str, Figure]]:
    """``{file stem: (title, figure)}`` of what the Report alone holds."""
    from deadneuron.render import plots

    figures = {
        "site_health": ("Per-site sparsity, flat fraction, dead and dormant channels", plots.plot_site_health(report)),
        "channel_heatmap": ("Per-channel firing rate (dead channels in red)", plots.plot_channel_heatmap(report)),
        "channel_moments": (
            "Per-channel activation mean, std, min and max, spread over each site's channels",
            plots.plot_activation_distributions(report),
        ),
    }
    if any(s.histogram is not None for s in report.sites.values()):
        figures["activation_histograms"] = (
            "Activation histograms per site (log counts)",
            plots.plot_activation_histograms(report),
        )
    if report.slots is not None:
        figures["active_slots"] = ("Active slots per image", plots.plot_active_slots(report.slots))
    return figures


def timeline_figure(checkpoint: Mapping[str, Any]) -> Figure | None:
    """The health timeline of a checkpoint (or of a saved timeline.json), None when it has none."""
    timeline = checkpoint.get("health_timeline") or []
    if not timeline:
        return None
    from deadneuron.render.plots import plot_health_timeline

    return plot_health_timeline(timeline, checkpoint.get("history") or [])


def sample_batch(adapter: Any, checkpoint: Mapping[str, Any]) -> Any:
    """A held-out batch of grids big enough to show structure (the first one otherwise)."""
    first = None
    for i, batch in enumerate(adapter.batches("heldout", checkpoint.get("config", {}))):
        first = batch if first is None else first
        target = getattr(batch, "target", None)
        if target is not None and max(target.shape[-2:]) >= SAMPLE_MIN_SIDE:
            return batch
        if i >= SAMPLE_MAX_BATCHES:
            break
    return first


def extra_figures(
    *, model: Any = None, adapter: Any = None, checkpoint: Mapping[str, Any] | None = None, warn: Warn = _stderr
) -> dict[str, tuple[str, Figure]]:
    """Figures that need more than the Report: slot samples (model + adapter), timeline (checkpoint)."""
    out: dict[str, tuple[str, Figure]] = {}
    checkpoint = checkpoint or {}
    if model is not None and adapter is not None:
        from deadneuron.render.plots import plot_slot_samples

        try:
            batch = sample_batch(adapter, checkpoint)
            if batch is not None:
                figure = plot_slot_samples(model, adapter, batch)
                out["slot_samples"] = ("Sample grids, reconstructions and slot masks", figure)
        except (ValueError, TypeError, AttributeError) as exc:
            warn(f"slot samples not drawn: {exc}")
    timeline = timeline_figure(checkpoint)
    if timeline is not None:
        out["health_timeline"] = ("Health over training", timeline)
    return out


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create report folder {out}: {exc.strerror}") from exc


def _pngs(figures: Mapping[str, tuple[str, Figure]]) -> dict[str, tuple[str, bytes]]:
    from deadneuron.render.plots import figure_png

    return {stem: (title, figure_png(fig)) for stem, (title, fig) in figures.items()}


def save_report(report: Report, path: str | Path) -> Path:
    """Write ``report`` as JSON to ``path`` atomically (`Report.from_json` reads it back)."""
    return write_text_file(report.to_json(indent=1), Path(path))


def write_text_file(text: str, path: Path) -> Path:
    from deadneuron.checkpoint import atomic_write_text

    try:
        return atomic_write_text(text, path, force=True)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from exc


def write_bytes_file(data: bytes, path: Path) -> Path:
    from deadneuron.checkpoint import atomic_write_bytes

    try:
        return atomic_write_bytes(data, path, force=True)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from exc


def parse_formats(text: str | Iterable[str]) -> tuple[Format, ...]:
    """``"md,html"`` or ``["md", "png"]`` or ``"all"`` -> formats in canonical order; ValueError otherwise."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if items == ["all"]:
        return FORMATS
    unknown = [p for p in items if p not in FORMATS]
    if unknown or not items:
        raise ValueError(f"formats are {', '.join(FORMATS)} or all, got {', '.join(unknown) or 'none'}")
    return tuple(f for f in FORMATS if f in items)


def write_report(
    report: Report,
    out: str | Path,
    *,
    model: Any = None,
    adapter: Any = None,
    checkpoint: Mapping[str, Any] | None = None,
    formats: Sequence[Format] = FORMATS,
    warn: Warn = _stderr,
) -> list[Path]:
    """Write the report folder ``out``; returns the paths written."""
    folder = Path(out)
    figures: dict[str, tuple[str, bytes]] = {}
    if {"png", "html"} & set(formats):  # drawn before any file is written: a figure that fails leaves none
        drawn = {**report_figures(report), **extra_figures(model=model, adapter=adapter, checkpoint=checkpoint, warn=warn)}
        figures = _pngs(drawn)
    _mkdir(folder)
    written: list[Path] = []
    if "json" in formats:
        written.append(save_report(report, folder / "report.json"))
    timeline = list((checkpoint or {}).get("health_timeline") or [])
    if timeline:
        keep = {"health_timeline": timeline, "history": list((checkpoint or {}).get("history") or [])}
        written.append(write_text_file(json.dumps(keep, indent=1, default=str), folder / TIMELINE_FILE))
    if "png" in formats:
        written += [write_bytes_file(png, folder / f"{stem}.png") for stem, (_, png) in figures.items()]
    if "md" in formats:
        from deadneuron.render.markdown import render_markdown

        links = {f"{stem}.png": title for stem, (title, _) in figures.items()} if "png" in formats else {}
        written.append(write_text_file(render_markdown(report, figures=links), folder / "report.md"))
    if "html" in formats:
        from deadneuron.render.html import render_html

        embedded = {title: png for title, png in figures.values()}
        written.append(write_text_file(render_html(report, figures=embedded), folder / "report.html"))
    return written


def read_timeline(folder: Path) -> dict[str, Any]:
    """The ``timeline.json`` kept beside a report (empty when there is none)."""
    path = folder / TIMELINE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than json.loads can go
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["FORMATS", "extra_figures", "parse_formats", "read_timeline", "report_figures", "write_report"]
