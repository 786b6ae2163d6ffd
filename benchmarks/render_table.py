"""Markdown tables from a results JSON of benchmarks/overhead.py; ``--write`` puts them into the docs.

    python benchmarks/render_table.py [RESULTS.json]            # print the tables (default: newest result)
    python benchmarks/render_table.py [RESULTS.json] --write    # rewrite README.md and docs/performance.md

The tables sit between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` markers: ``summary``
in README.md, ``details`` in docs/performance.md. Everything between the markers is replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_COLUMNS = ("captum", "fastai-style", "torchlens")
TARGETS = {"summary": ROOT / "README.md", "details": ROOT / "docs" / "performance.md"}


def newest(results: Path = HERE / "results") -> Path:
    files = sorted(p for p in results.glob("*.json") if not p.stem.endswith("-quick"))
    if not files:
        raise SystemExit(f"no results in {results}: run benchmarks/overhead.py first")
    return files[-1]


def _run(data: dict[str, Any], threads: int, allocator: str, *, peer: str | None = None) -> dict[str, Any] | None:
    """The run of that thread count and allocator (with ``peer``: the run that measured that peer)."""
    for run in data["runs"]:
        if run["threads"] != threads or run["allocator"] != allocator or "models" not in run:
            continue
        if (peer is None and run.get("peers") == ["torchlens"]) or (peer is not None and peer not in run.get("peers", ())):
            continue
        return run
    return None


def _model(run: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if run is None:
        return None
    return next((m for m in run["models"] if m["key"] == key and "failed" not in m), None)


def _ratio(run: dict[str, Any] | None, key: str, side: str, *, bold: bool = False, spread: bool = False) -> str:
    m = _model(run, key)
    s = m["sides"].get(side) if m is not None else None
    if s is None:
        return "n/a"
    text = f"{s['ratio']:.2f}x"
    text = f"**{text}**" if bold else text
    return f"{text} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})" if spread else text


def _models(data: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for run in data["runs"]:
        for m in run.get("models", ()):
            seen.setdefault(m["key"], m)
    return list(seen.values())


def _plain_ms(data: dict[str, Any], threads: int, key: str) -> str:
    m = _model(_run(data, threads, "glibc"), key)
    return f"{m['plain_ms_per_batch']:.1f} ms" if m is not None else "n/a"


def source_line(data: dict[str, Any], source: str) -> str:
    load = data.get("load_average", {})
    loads = "/".join(f"{x[0]:.1f}" for x in (load.get("start"), load.get("end")) if x)
    note = f" {data['note']}." if data.get("note") else ""
    quick = " QUICK RUN (tiny batches, 1 round): not a measurement." if data.get("quick") else ""
    return (f"From `benchmarks/results/{source}` ({data['date'][:10]}, {data['cpu']}, {data['cores']} cores, "
            f"torch {data['torch']}, deadneuron {data.get('git') or data['deadneuron']}, load average {loads} "
            f"at start/end).{note}{quick}")  # fmt: skip


def summary(data: dict[str, Any], source: str) -> str:
    """README: one thread, glibc defaults, deadneuron beside each peer."""
    run, lens = _run(data, 1, "glibc"), _run(data, 1, "glibc", peer="torchlens")
    rows = ["| model | plain forward, per batch | deadneuron | captum | fastai-style | torchlens |", "|---|---:|---:|---:|---:|---:|"]
    for m in _models(data):
        rows.append(f"| {m['name']}, {m['shape']} | {_plain_ms(data, 1, m['key'])} | {_ratio(run, m['key'], 'deadneuron', bold=True)} | "
                    f"{_ratio(run, m['key'], 'captum')} | {_ratio(run, m['key'], 'fastai-style')} | "
                    f"{_ratio(lens, m['key'], 'torchlens')} |")  # fmt: skip
    return "\n".join([*rows, "", source_line(data, source)])


def _thread_table(data: dict[str, Any], threads: int) -> list[str]:
    glibc, tuned = _run(data, threads, "glibc"), _run(data, threads, "tuned")
    lens = _run(data, threads, "glibc", peer="torchlens")
    clock = " of CPU time" if data.get("clock") == "cpu" else ""
    rows = [f"{threads} thread(s), median of per-round ratios{clock} (min-max over rounds):", "",
            "| model | sites | plain forward / batch | deadneuron, glibc defaults | deadneuron, tuned allocator | "
            "whole audit call | captum | fastai-style | torchlens |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in _models(data):
        k = m["key"]
        g = _model(glibc, k)
        whole = f"{g['sides']['deadneuron']['whole_ratio']:.2f}x" if g and "deadneuron" in g["sides"] else "n/a"
        rows.append(f"| {m['name']}, {m['shape']} | {m.get('sites', '?')} | {_plain_ms(data, threads, k)} | "
                    f"{_ratio(glibc, k, 'deadneuron', bold=True, spread=True)} | {_ratio(tuned, k, 'deadneuron', spread=True)} | "
                    f"{whole} | {_ratio(glibc, k, 'captum')} | {_ratio(glibc, k, 'fastai-style')} | "
                    f"{_ratio(lens, k, 'torchlens')} |")  # fmt: skip
    return rows


def _memory_table(data: dict[str, Any]) -> list[str]:
    mem = data.get("memory", {})
    rows = [f"Memory, measured ({mem.get('model', '?')}; a fresh process per row, growth over the process after "
            "a warm-up run of the same length; retained: with the audit's Report still held):", "",
            "| side | batches | peak RSS growth | RSS growth when batch i is asked for | Python allocations, "
            "peak | Python allocations, retained |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in mem.get("points", ()):
        if "failed" in p:
            rows.append(f"| failed: {p['failed']} | | | | | |")
            continue
        rss = f"{p['peak_rss_growth_kb']:,} KB" if p.get("peak_rss_growth_kb") is not None else "n/a"
        trace = "; ".join(f"{i}: {kb:,} KB" for i, kb in p.get("rss_growth_kb_at_batch", {}).items()) or "n/a"
        rows.append(f"| {p['side']} | {p['batches']} | {rss} | {trace} | {p['tracemalloc_peak_kb']:,.1f} KB | "
                    f"{p['tracemalloc_retained_kb']:,.1f} KB |")  # fmt: skip
    return rows


def _problems(data: dict[str, Any]) -> list[str]:
    out = [f"- {name}: not installed" for name, v in data.get("peers", {}).items() if v is None]
    for run in data["runs"]:
        where = f"{run['threads']} thread(s), {run['allocator']}"
        if "failed" in run:
            out.append(f"- {where}, peers {run.get('peers')}: {run['failed']}")
        for m in run.get("models", ()):
            if "failed" in m:
                out.append(f"- {where}: {m['name']}: {m['failed']}")
            for peer, error in m.get("errors", {}).items():
                out.append(f"- {where}: {m['name']}: {peer} failed: {error}")
    return out


def details(data: dict[str, Any], source: str) -> str:
    """docs/performance.md: every thread count, both allocator settings, the whole call, memory."""
    parts: list[str] = []
    for threads in data["threads"]:
        parts += [*_thread_table(data, threads), ""]
    parts += _memory_table(data)
    problems = _problems(data)
    if problems:
        parts += ["", "Left out of this run:", "", *problems]
    return "\n".join([*parts, "", source_line(data, source)])


RENDERERS: dict[str, Callable[[dict[str, Any], str], str]] = {"summary": summary, "details": details}


def render_all(data: dict[str, Any], *, source: str) -> str:
    return "\n\n".join(f(data, source) for f in (summary, details))


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- bench:{name}:begin -->\n).*?(<!-- bench:{name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- bench:{name}:begin/end --> markers found")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text, count=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="a results JSON (default: the newest in benchmarks/results/)")
    ap.add_argument("--write", action="store_true", help="rewrite the marked tables in README.md and docs/performance.md")
    args = ap.parse_args(argv)
    path = Path(args.results) if args.results else newest()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read {path}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not args.write:
        print(render_all(data, source=path.name))
        return
    for name, target in TARGETS.items():
        target.write_text(replace_block(target.read_text(), name, RENDERERS[name](data, path.name)))
        print(f"rewrote the {name} table in {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
