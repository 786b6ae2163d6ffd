"""The sites a `deadneuron.probe.recorder.Recorder` keeps, read back: their final names and results."""

from __future__ import annotations

from typing import Any

import torch

from deadneuron.probe.site import Site, SiteResult, shown_name, site_names


class SiteTable:
    """Every site of one recorder by key (its call place: the same in every process), in order of first call."""

    _sites: dict[tuple[Any, ...], Site]
    _last: Site | None

    @property
    def last_site(self) -> str | None:
        """The site measured last in this batch, named as the site table names it (error messages), or None."""
        return shown_name(self._sites.values(), self._last) if self._last is not None else None

    def site_names(self) -> list[str]:
        """Final names of the sites, in order of first call."""
        return site_names(list(self._sites.values()))

    def keyed_sites(self) -> list[tuple[tuple[Any, ...], str, Site]]:
        """Every site with its key and final name, in call order."""
        return list(zip(self._sites, self.site_names(), self._sites.values(), strict=True))

    def named_sites(self) -> list[tuple[str, Site]]:
        """(final name, running state) of every site, in order of first call (for observers)."""
        return list(zip(self.site_names(), self._sites.values(), strict=True))

    def state_bytes(self) -> int:
        """Memory held by the statistics of every site (O(channels), independent of batches)."""
        return sum(s.stats.state_bytes() for s in self._sites.values())

    def results(self) -> list[SiteResult]:
        with torch._C.DisableTorchFunction():
            return [s.result(name) for name, s in zip(self.site_names(), self._sites.values(), strict=True)]
