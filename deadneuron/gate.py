"""Health gates: pure checks of a Report against limits (used by `deadneuron audit --max-*` and testing).

A gate lists *every* violated check, one Violation per offending site, so that a CI log or an assertion
message names all the layers to look at, not only the first. Scoping globs (``sites``) match a site's
name or its module's qualified name; a glob that matches no site is itself a violation, so that a typo
in a CI configuration cannot make a gate pass silently. Asking for a slot limit on a report without slot
measurements is a violation for the same reason, and so is a per-site limit on a report without sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from deadneuron.errors import UsageError
from deadneuron.report import Report, SiteHealth

Check = Literal["max_dead", "max_dead_fraction", "max_sparsity", "max_nonfinite", "min_active_slots", "sites"]


@dataclass(frozen=True)
class GateLimits:
    """Limits; None means "not checked". ``sites`` are globs scoping the per-site checks (empty: all)."""

    max_dead: int | None = None  # dead channels allowed in any one site
    max_dead_fraction: float | None = None  # share of a site's channels allowed to be dead (0.05, or "5%")
    max_sparsity: float | None = None  # a site's exact-zero share (0.6, or "60%")
    min_active_slots: float | None = None  # mean active slots per image
    sites: tuple[str, ...] = ()
    max_nonfinite: int | None = None  # NaN/Inf activations allowed in any one site

    def __post_init__(self) -> None:
        for name in ("max_dead", "max_nonfinite"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"{name} must be >= 0 (a whole number), got {value!r}")
        for name in ("max_dead_fraction", "max_sparsity"):  # 0.05 or "5%"
            object.__setattr__(self, name, fraction(getattr(self, name), name))
        slots = self.min_active_slots
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, (int, float)) or not slots >= 0):
            raise UsageError(f"min_active_slots must be a number >= 0, got {slots!r}")
        object.__setattr__(self, "sites", (self.sites,) if isinstance(self.sites, str) else tuple(self.sites))

    @property
    def active(self) -> bool:
        """True when at least one limit is set."""
        limits = (self.max_dead, self.max_dead_fraction, self.max_sparsity, self.min_active_slots, self.max_nonfinite)
        return any(v is not None for v in limits)


def fraction(value: object, name: str) -> float | None:
    """A share limit as a fraction in [0, 1]: a number (0.05) or a percentage string ("5%"; "0.05" is read too).
    UsageError for anything else, saying how 5% is written."""
    if value is None:
        return None
    number: object = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise UsageError(f"{name} must be a fraction in [0, 1] or a percentage, got {value!r} (5% is 0.05 or '5%')")
    if not 0.0 <= number <= 1.0:
        raise UsageError(f"{name} must be a fraction in [0, 1], got {float(number)} (5% is 0.05 or '5%')")
    return float(number)


@dataclass(frozen=True)
class Violation:
    """One failed check: where, what was observed, the limit, and a sentence saying so."""

    check: Check
    site: str | None
    observed: float
    limit: float
    detail: str

    def __str__(self) -> str:
        where = self.site or ("scope" if self.check == "sites" else "report")
        return f"{where}: {self.detail}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ids(ids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def scoped_sites(report: Report, globs: Sequence[str]) -> list[SiteHealth]:
    """The report's sites matching any glob (by site name or module name); all of them for no globs."""
    if not globs:
        return list(report.sites.values())
    return [s for s in report.sites.values() if any(_matches(s, g) for g in globs)]


def _matches(site: SiteHealth, glob: str) -> bool:
    return fnmatchcase(site.name, glob) or fnmatchcase(site.module, glob)


def _unmatched_globs(report: Report, globs: Sequence[str]) -> list[Violation]:
    names = list(report.sites)
    known = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return [
        Violation("sites", None, 0.0, 1.0, f"no site matches {g!r} (sites: {known or 'none'})")
        for g in globs
        if not any(_matches(s, g) for s in report.sites.values())
    ]


def _site_violations(site: SiteHealth, limits: GateLimits) -> list[Violation]:
    out: list[Violation] = []
    dead = len(site.dead_channels)
    dead_text = f"{dead} of {site.channels} channels dead ({_ids(site.dead_channels)})"
    if limits.max_dead is not None and dead > limits.max_dead:
        out.append(Violation("max_dead", site.name, dead, limits.max_dead, f"{dead_text} > max_dead {limits.max_dead}"))
    if limits.max_dead_fraction is not None and site.dead_fraction > limits.max_dead_fraction:
        out.append(
            Violation(
                "max_dead_fraction", site.name, site.dead_fraction, limits.max_dead_fraction,
                f"{dead} of {site.channels} channels dead ({_pct(site.dead_fraction)}: {_ids(site.dead_channels)}) "
                f"> max_dead_fraction {_pct(limits.max_dead_fraction)}",
            )
        )  # fmt: skip
    if limits.max_sparsity is not None and site.sparsity > limits.max_sparsity:
        out.append(
            Violation(
                "max_sparsity", site.name, site.sparsity, limits.max_sparsity,
                f"sparsity {_pct(site.sparsity)} > max_sparsity {_pct(limits.max_sparsity)}",
            )
        )  # fmt: skip
    if limits.max_nonfinite is not None and site.nonfinite > limits.max_nonfinite:
        channels = [c for c, n in enumerate(site.channel_nonfinite) if n]
        out.append(Violation("max_nonfinite", site.name, site.nonfinite, limits.max_nonfinite,
                             f"{site.nonfinite} non-finite activations (NaN/Inf) in channel{'s' if len(channels) > 1 else ''} "
                             f"{_ids(channels)} > max_nonfinite {limits.max_nonfinite}"))  # fmt: skip
    return out


def _slot_violations(report: Report, minimum: float) -> list[Violation]:
    if report.slots is None:
        return [Violation("min_active_slots", None, 0.0, minimum, "no slot masks were measured, so min_active_slots cannot pass")]
    active = report.slots.mean_active
    if active >= minimum:
        return []
    detail = f"{active:.2f} active slots per image (of {report.slots.num_slots}) < min_active_slots {minimum:g}"
    return [Violation("min_active_slots", "slots", active, minimum, detail)]


def check(report: Report, limits: GateLimits) -> tuple[Violation, ...]:
    """Every violated check of ``report`` under ``limits``, in site order (empty: the gate passes)."""
    if not limits.active:
        return ()
    per_site = (limits.max_dead, limits.max_dead_fraction, limits.max_sparsity, limits.max_nonfinite)
    if not report.sites and any(v is not None for v in per_site):
        return (Violation("sites", None, 0.0, 1.0, "the report has no activation site: nothing was measured, "
                          "so no per-site limit can pass"),)  # fmt: skip
    out = _unmatched_globs(report, limits.sites)
    for site in scoped_sites(report, limits.sites):
        out.extend(_site_violations(site, limits))
    if limits.min_active_slots is not None:
        out.extend(_slot_violations(report, limits.min_active_slots))
    return tuple(out)


def failure_message(violations: Sequence[Violation], *, header: str = "activation health check failed") -> str:
    """A multi-line message listing each violation (one line per offending site and check)."""
    count = len(violations)
    lines = [f"{header}: {count} violated check{'s' if count != 1 else ''}"]
    lines += [f"  {v}" for v in violations]
    return "\n".join(lines)


__all__ = ["Check", "GateLimits", "Violation", "check", "failure_message", "fraction", "scoped_sites"]
